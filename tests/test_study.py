"""The quality study: selection rule, matched-FLOPs interpolation, bootstrap, and every stage end to end on the
real stories260K weights (tiny windows), down to the Markdown report and the Pareto PNG."""

from __future__ import annotations

import math

import pytest
import torch

from tokenfilter.cli import main
from tokenfilter.eval.shortgpt import block_influence
from tokenfilter.study import variants
from tokenfilter.study.bootstrap import paired_interval
from tokenfilter.study.curves import matched_log_ppl
from tokenfilter.study.report import plot, render
from tokenfilter.study.runner import (
    StudyConfig,
    _heldout,
    _layer_probe,
    _second_model,
    _select,
    choose,
    run_study,
)

from conftest import STORIES, make_tiny, random_ids

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_matched_log_ppl_interpolates_from_dense_and_refuses_to_extrapolate():
    pts = [{"flops_saved": 0.1, "ppl": 20.0}, {"flops_saved": 0.2, "ppl": 40.0}]
    got = matched_log_ppl(pts, 10.0, [0.0, 0.05, 0.15, 0.2, 0.3])
    assert got[0] == pytest.approx(math.log(10))
    assert got[1] == pytest.approx((math.log(10) + math.log(20)) / 2)
    assert got[2] == pytest.approx((math.log(20) + math.log(40)) / 2)
    assert got[3] == pytest.approx(math.log(40))
    assert got[4] == math.inf


def test_choose_compares_at_the_paper_flops_not_at_the_token_ratio():
    # "cheap" has lower PPL at each ratio but saves half the FLOPs: at matched FLOPs it is worse than "paper"
    runs = {
        "paper": {"0.1": {"flops_saved": 0.1, "ppl": 20.0}, "0.3": {"flops_saved": 0.3, "ppl": 40.0}},
        "cheap": {"0.1": {"flops_saved": 0.05, "ppl": 18.0}, "0.3": {"flops_saved": 0.15, "ppl": 35.0}},
        "good": {"0.1": {"flops_saved": 0.1, "ppl": 15.0}, "0.3": {"flops_saved": 0.3, "ppl": 30.0}},
        "random@paper": {"0.1": {"flops_saved": 0.1, "ppl": 1.0}, "0.3": {"flops_saved": 0.3, "ppl": 1.0}},
    }
    choice = choose({"dense": {"ppl": 10.0}, "runs": runs}, [0.1, 0.3])
    assert choice["chosen"] == "good"  # random twins are never chosen
    assert choice["score"]["cheap"] == math.inf  # cannot reach the paper's 30% saving
    assert choice["levels"] == [0.1, 0.3]


def test_paired_interval():
    a = {"t1": {1: 1.0, 3: 1.0, 5: 0.0}, "t2": {1: 1.0, 3: 1.0}}
    same = paired_interval(a, a)
    assert same == {"diff": 0.0, "lo": 0.0, "hi": 0.0}
    zeros = {t: {i: 0.0 for i in d} for t, d in a.items()}
    d = paired_interval(a, zeros)
    assert d["diff"] == pytest.approx((2 / 3 + 1) / 2)  # the mean of the per-task means
    assert d["lo"] <= d["diff"] <= d["hi"]
    with pytest.raises(ValueError, match="different documents"):
        paired_interval(a, {"t1": {1: 0.0}, "t2": {1: 0.0, 3: 0.0}})


def test_single_layer_probe_filters_only_that_layer():
    model = make_tiny("llama")
    tf = variants.single_layer(model.config.num_hidden_layers, 2, 0.5)
    with tf.apply(model) as run, torch.no_grad():
        model(random_ids(1, 64))
    per_layer = run.stats.ratio_per_layer
    assert per_layer[2] == pytest.approx(0.5, abs=0.05)
    assert [r for i, r in enumerate(per_layer) if i != 2] == [0.0] * (len(per_layer) - 1)


def test_candidates_and_random_twins():
    assert variants.PAPER in variants.CANDIDATES
    for name in variants.all_names():
        tf = variants.filter_of(name, 0.3, seed=1)
        assert tf.ratio == pytest.approx(0.3)
        assert (tf.score == "random") == name.startswith("random@")
    assert variants.filter_of("random@tail-from-2", 0.3).start_layer == 2
    with pytest.raises(ValueError, match="Unknown study candidate"):
        variants.kwargs_of("nope")


@pytest.fixture(scope="module")
def stories_study():
    """Every stage on stories260K with tiny inputs (no tokenizer needed: the windows are token ids)."""
    if not (STORIES / "config.json").exists():
        pytest.skip("needs ../shared/models/stories260K")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    cfg = StudyConfig(model=str(STORIES), ratios=[0.2, 0.4], candidates=["paper", "kv-keep"], ppl_window=48,
                      seeds=2, second_samples=2, second_length=40)
    ids = random_ids(4, 48, vocab=512, seed=3)
    result = {"config": {"ratios": cfg.ratios}, "model": "stories260K", "seconds": 1.0, "threads": 1}
    result["layers"] = _layer_probe(model, ids[0::2], cfg, progress=False)
    result["select"] = _select(model, ids[0::2], cfg, progress=False)
    result["chosen"] = result["select"]["choice"]["chosen"]
    influence = block_influence(model, ids[:2])
    result["heldout"] = _heldout(model, {"wikitext2": ids[1::2]}, result["chosen"], influence, cfg, progress=False)
    result["second"] = _second_model(cfg, result["chosen"], progress=False)
    return result


def test_study_stages_structure(stories_study):
    r = stories_study
    assert len(r["layers"]["rows"]) == 5
    assert set(r["select"]["runs"]) == {"paper", "kv-keep", "random@paper", "random@kv-keep"}
    assert r["chosen"] in ("paper", "kv-keep")
    for runs in r["select"]["runs"].values():
        for ratio, point in runs.items():
            assert point["realized_ratio"] == pytest.approx(float(ratio), abs=0.05)
            assert 0 < point["flops_saved"] < 1 and point["ppl"] > 1
    held = r["heldout"]["runs"]
    assert {f"random@{r['chosen']}#s0", f"random@{r['chosen']}#s1", "paper"} <= set(held)
    # different seeds choose different tokens
    assert held[f"random@{r['chosen']}#s0"]["0.4"]["ppl"] != held[f"random@{r['chosen']}#s1"]["0.4"]["ppl"]
    curve = r["heldout"]["shortgpt"]
    assert [c["layers_removed"] for c in curve] == list(range(1, len(curve) + 1))
    assert curve[-1]["flops_saved"] >= max(p["flops_saved"] for p in held["paper"].values())
    assert r["second"]["runs"]["paper"]["0.2"]["ppl"]["stories"] > 1


def test_study_report_and_plot(stories_study, tmp_path):
    text = render(stories_study, "tokenfilter study --test")
    assert "Per-layer sensitivity" in text and "Selection half" in text and "Verdict" in text
    assert f"**Chosen: `{stories_study['chosen']}`**" in text
    assert "layer removal at the same FLOPs" in text
    plot(stories_study, tmp_path / "study.png")
    assert (tmp_path / "study.png").read_bytes()[:8] == PNG_MAGIC


def test_bad_study_arguments_fail_before_loading_anything(capsys):
    with pytest.raises(ValueError, match="Unknown study stage"):
        run_study(StudyConfig(stages=["nope"]))
    assert main(["study", "--candidates", "nope", "--output", "unused"]) == 2
    assert "Unknown study candidate" in capsys.readouterr().err


def test_accuracy_stage_on_held_out_documents():
    """Odd-numbered documents only, per-document correctness kept, seeds spread and paired intervals computed."""
    from tiny_lm import olmo_eval_or_skip, one_thread, tiny_lm
    from tokenfilter.study.runner import _accuracy

    olmo_eval_or_skip()
    model, tok = tiny_lm()
    cfg = StudyConfig(ratios=[0.3], tasks=["piqa", "boolq"], acc_docs=3, seeds=2, batch_size=2)
    with one_thread():
        acc = _accuracy(model, tok, "paper", [0.1, 0.2, 0.3, 0.4], cfg, progress=False)
    assert set(acc["dense"]["per_doc"]) == {"piqa", "boolq"}
    assert sorted(acc["dense"]["per_doc"]["piqa"]) == [1, 3, 5]
    assert set(acc["runs"]) == {"paper", "random@paper#s0", "random@paper#s1", "shortgpt"}
    s = acc["summary"]["0.3"]
    assert s["random_spread"] >= 0 and len(s["vs_random"]) == 2
    assert s["vs_shortgpt"]["lo"] <= s["vs_shortgpt"]["diff"] <= s["vs_shortgpt"]["hi"]
    assert acc["runs"]["shortgpt"]["0.3"]["layers_removed"] >= 1


@pytest.mark.slow
def test_study_command_on_smollm2(tmp_path, capsys):
    """``tokenfilter study`` end to end on the real default model (two candidates, small windows): JSON, PNG, the
    report, and the 'how we chose the defaults' section of a results file that keeps its other sections."""
    import json

    from tiny_lm import one_thread, smollm2_or_skip
    from tokenfilter.eval.sections import sections, write_section

    smollm2_or_skip()
    results_md = tmp_path / "results.md"
    write_section(results_md, "longctx", "## Long context\nkept")
    with one_thread():
        code = main(["study", "--stages", "select,heldout", "--candidates", "paper,tail-from-2", "--ratios", "0.3",
                     "--ppl-window", "128", "--ppl-windows", "4", "--lambada-windows", "0", "--seeds", "2",
                     "--no-second", "--output", str(tmp_path / "out"), "--write-docs", str(tmp_path / "study.md"),
                     "--results-md", str(results_md)])
    assert code == 0
    result = json.loads((tmp_path / "out" / "study.json").read_text())
    assert result["chosen"] in ("paper", "tail-from-2")
    assert set(result["select"]["runs"]) == {"paper", "tail-from-2", "random@paper", "random@tail-from-2"}
    assert (tmp_path / "study.png").read_bytes()[:8] == PNG_MAGIC
    assert "Held-out perplexity" in (tmp_path / "study.md").read_text()
    text = results_md.read_text()
    assert list(sections(text)) == ["longctx", "study"] and "## How we chose the defaults" in text
    assert "(study.md)" in text
