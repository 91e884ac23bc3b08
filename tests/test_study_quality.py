"""The KV-side study end to end on a tiny model: the choice rule, the held-out comparison and its report."""

from __future__ import annotations

import json

import pytest
import torch

from tiny_lm import save_tiny_lm, tiny_lm
from tokenfilter import TokenFilter
from tokenfilter.study import quality
from tokenfilter.study.quality_report import render


def _run(d: float, found: float) -> dict:
    return {"ppl": d, "kv_held": 0.5, "pairs": 0.6, "realized_ratio": 0.5, "needle": {"found": found}}


def test_choice_is_most_needle_hits_within_the_perplexity_target():
    sel = {"dense": {"ppl": 10.0}, "runs": {"a": _run(10.5, 0.4), "b": _run(10.7, 0.6), "c": _run(12.0, 0.9),
                                            "d": _run(10.2, 0.6)}}
    choice = quality.choose(sel, 0.5)
    assert choice["within_target"] == ["a", "b", "d"]  # c is above 1.08x dense
    assert choice["chosen"] == "d"  # b and d tie on the needle: the lower perplexity wins


def test_sliding_window_holding_holds_the_asked_share():
    tf = TokenFilter.sliding_window_holding(0.5, 1024, warmup=4)
    assert tf.warmup + tf.recent - 1 == 512


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


def test_report_renders_the_tables_and_verdicts(tiny_study):
    result, _ = tiny_study
    text = render({"models": {"tiny": result}, "commands": ["tokenfilter study --kv-side"], "seconds": 1})
    assert "### Selection half" in text and "### Held-out half: tiny" in text
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
