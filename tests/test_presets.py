"""Engine III, item 5: every named configuration lives in ``tokenfilter.presets``, one name each; eval, study, peers
and the CLI read theirs from there, and older names (aliases) still give the same configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest

from tokenfilter import presets

ROOT = Path(__file__).resolve().parents[1]


def _names_with_twins() -> list[str]:
    """Every canonical name: the presets and the random twin of each one that is not random already."""
    twins = [f"{n}{presets.RANDOM_SUFFIX}" for n, f in presets.PRESETS.items() if f.get("score") != "random"]
    return list(dict.fromkeys(presets.canonical(n) for n in [*presets.PRESETS, *twins]))


def test_importing_presets_and_eval_methods_loads_nothing_heavy() -> None:
    code = ("import sys, tokenfilter.presets, tokenfilter.eval.methods, tokenfilter.cli; "
            "heavy = [m for m in ('torch', 'transformers', 'tokenfilter.config') if m in sys.modules]; "
            "assert not heavy, heavy")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)


def test_the_groups_share_no_name_and_aliases_are_not_presets() -> None:
    groups = (presets.LIBRARY, presets.QUERY_STUDY, presets.KV_STUDY)
    assert len(presets.PRESETS) == sum(map(len, groups))
    assert not set(presets.ALIASES) & set(presets.PRESETS)


@pytest.mark.parametrize("name", _names_with_twins())
def test_every_name_builds_a_valid_filter(name: str) -> None:
    from tokenfilter.config import TokenFilter

    tf = presets.build(name, 0.5)
    assert isinstance(tf, TokenFilter) and tf.ratio == 0.5
    assert tf == TokenFilter(ratio=0.5, **presets.fields(name))


@pytest.mark.parametrize(("alias", "target"), list(presets.ALIASES.items()))
def test_an_alias_gives_the_fields_of_its_canonical_name(alias: str, target: str) -> None:
    assert target in presets.PRESETS
    assert presets.canonical(alias) == target
    assert presets.fields(alias) == presets.fields(target)
    assert presets.build(alias, 0.3) == presets.build(target, 0.3)
    twin = f"{alias}{presets.RANDOM_SUFFIX}"  # the twin of an older name is the twin of the canonical one
    assert presets.build(twin, 0.3) == presets.build(presets.canonical(twin), 0.3)


def test_kv_window_is_the_older_name_of_kv_w64() -> None:
    assert presets.canonical("kv-window") == "kv-w64"
    assert presets.canonical("kv-window-random") == "kv-w64-random"
    assert presets.canonical("default-random") == "random"
    assert presets.build("kv-window-random", 0.5).score == "random"


def test_no_two_names_give_the_same_filter() -> None:
    built = {name: presets.build(name, 0.5) for name in presets.PRESETS}
    same = [(a, b) for (a, fa), (b, fb) in combinations(built.items(), 2) if fa == fb]
    assert not same, f"these name the same configuration: declare one an alias of the other: {same}"
    # a random twin that is a named configuration is named by it (twins of candidates that differ in their score
    # alone are one twin under several names: the twin is derived from its candidate, not named)
    for twin in _names_with_twins():
        named = [name for name, tf in built.items() if tf == presets.build(twin, 0.5)]
        assert named in ([], [presets.canonical(twin)]), (twin, named)


def test_unknown_names_are_refused() -> None:
    assert not presets.is_known("kv-w65")
    with pytest.raises(ValueError, match="Unknown configuration 'kv-w65'"):
        presets.fields("kv-w65")
    with pytest.raises(KeyError):
        presets.canonical("nope-random")


def test_the_config_module_keeps_its_names_and_presets() -> None:
    from tokenfilter import config
    from tokenfilter.config import TokenFilter

    assert config.SPEC_SCORE is presets.SPEC_SCORE
    assert config.QUERY_SIDE is presets.QUERY_SIDE
    assert config.PAPER_READING is presets.PAPER_READING
    assert TokenFilter.paper(ratio=0.4) == presets.build("paper", 0.4)
    window = TokenFilter.sliding_window(recent=32, warmup=2)
    assert window == TokenFilter(**presets.sliding_window(32, 2))
    assert (window.recent, window.warmup, window.score, window.start_layer) == (32, 2, "constant", 0)


def test_eval_reads_its_methods_from_presets() -> None:
    from tokenfilter.cli import EVAL_METHODS
    from tokenfilter.config import SlidingWindowShare
    from tokenfilter.eval import methods

    assert EVAL_METHODS == methods.ALL_METHODS
    assert all(presets.canonical(m) == m for m in methods.FILTER_METHODS)
    for name, fields in methods.FILTER_VARIANTS.items():
        assert fields == presets.fields(name), name
    assert methods.filter_for("kv-window", 0.5) == methods.filter_for("kv-w64", 0.5)
    assert methods.filter_for("sliding-window", 0.3) == SlidingWindowShare(held=0.7)
    # an older name is the same method: run once, under the name given first (recorded rows keep their label)
    assert methods.resolve_methods(["kv-window", "kv-w64", "random"]) == ["kv-window", "random"]
    with pytest.raises(ValueError, match="Unknown method 'fusion-mean'"):  # eval's is spec-fusion-mean now
        methods.resolve_methods(["fusion-mean"])


def test_the_studies_read_their_candidates_from_presets() -> None:
    from tokenfilter.study import quality, variants

    assert list(quality.CANDIDATES) == list(presets.KV_STUDY)
    assert quality.CANDIDATES == presets.KV_STUDY
    assert set(variants.CANDIDATES) - {"paper", "uniform-from-2", "uniform-from-2-kv-keep"} == set(presets.QUERY_STUDY)
    for name, fields in variants.CANDIDATES.items():
        assert fields == presets.fields(name), name
    assert variants.kwargs_of("random@uniform-from-2", seed=2) == presets.random_twin(presets.fields("query-side"), 2)


def test_peers_read_our_rows_from_presets() -> None:
    from tokenfilter.peers import cli

    methods = cli.our_methods([0.5], ["default", "default-random", "paper", "kv-window", "kv-w64-g0.99-random"])
    assert methods["token-filter-0.5"] == presets.build("token-filter", 0.5)
    assert methods["token-filter-random-0.5"] == presets.build("random", 0.5)
    assert methods["paper-0.5"] == presets.build("paper", 0.5)
    assert methods["kv-window-0.5"] == presets.build("kv-w64", 0.5)  # the older name keeps its row label
    assert methods["kv-w64-g0.99-random-0.5"] == presets.build("kv-w64-g0.99-random", 0.5)
    assert {"kv-w64", "kv-window", "kv-window-random"} <= set(cli.ours_choices())


def test_recorded_names_still_resolve() -> None:
    """The names docs/ records (the KV-side study's candidates, the peers' rows) are still the tools' names."""
    from tokenfilter.peers import cli
    from tokenfilter.study import quality

    study = json.loads((ROOT / "docs" / "kv-study.json").read_text(encoding="utf-8"))
    for model in study["models"].values():
        assert set(model.get("select", {}).get("runs", {})) <= set(quality.CANDIDATES)
        assert model["heldout"]["chosen"] in quality.CANDIDATES
    ours = json.loads((ROOT / "docs" / "peers" / "ours.json").read_text(encoding="utf-8"))
    labels = set(cli.our_methods([0.5], ["default", "default-random", "sliding-window"]))
    assert {r["method"] for r in ours["rows"]} <= labels
