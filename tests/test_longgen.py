"""``tokenfilter longgen``: the long-continuation benchmark on a tiny model (what it reads, what it writes)."""

from __future__ import annotations

import json

import pytest
import torch

from tokenfilter import TokenFilter
from tokenfilter.cli import build_parser
from tokenfilter.longctx.longgen import Row, continuation_nll, plan_rows, render_markdown, run_longgen

from conftest import make_tiny, random_ids


def test_a_chunked_read_scores_as_token_by_token():
    """The claim the benchmark's chunked rows rest on: under a budget (and dense) a call of many tokens scores the
    continuation as a token-by-token decode does."""
    model = make_tiny("llama")
    ids = random_ids(1, 140, seed=11)
    for cfg in (None, TokenFilter(budget=40, recent=8), TokenFilter(budget=40, recent=8, score="constant")):
        chunked = continuation_nll(model, ids, 30, Row("x", "x", cfg), chunk=25)
        stepwise = continuation_nll(model, ids, 30, Row("x", "x", cfg, stepwise=True))
        assert chunked[1] == stepwise[1] == 110
        assert chunked[0] == pytest.approx(stepwise[0], rel=1e-4)


def test_continuation_nll_is_the_models_own():
    model = make_tiny("qwen2")
    ids = random_ids(1, 60, seed=12)
    with torch.no_grad():
        logits = model(ids).logits[0, 19:-1].float()
    expected = torch.nn.functional.cross_entropy(logits, ids[0, 20:], reduction="sum").item()
    nll, count, stats = continuation_nll(model, ids, 20, Row("dense", "dense", None), chunk=16)
    assert count == 40 and stats is None and nll == pytest.approx(expected, rel=1e-4)


def test_run_writes_every_row_and_resumes(tmp_path):
    model = make_tiny("llama")
    seqs = {"a": random_ids(1, 120, seed=13), "b": random_ids(1, 120, seed=14)}
    rows = plan_rows([0.4], [48], [0, 1], recent=8)
    results = run_longgen(model, seqs, 40, rows, tmp_path, chunk=32, meta={"model": "tiny"})
    assert len(results) == 2 * len(rows)
    got = {(r.text, r.row): r for r in results}
    for text in seqs:
        assert got[(text, "dense")].kv_held == 1.0 and got[(text, "dense")].tokens == 80
        assert got[(text, "budget-48")].peak_held == 48 and got[(text, "budget-48")].kv_held < 1
        assert 0 < got[(text, "token-filter-0.4")].realized < 1 and got[(text, "random-0.4-seed0")].realized > 0
    saved = json.loads((tmp_path / "longgen.json").read_text())
    assert len(saved["results"]) == len(results)
    again = run_longgen(model, seqs, 40, rows, tmp_path, chunk=32, meta={"model": "tiny"}, resume=True)
    assert [r.seconds for r in again] == [r.seconds for r in results]  # nothing ran again
    table = render_markdown(results, rows, {})
    assert "budget-48-random (2 seeds)" in table and "streamingllm-48" in table and "(x1.000)" in table


def test_cli_arguments():
    args = build_parser("longgen").parse_args(["longgen", "--budgets", "256,512", "--seeds", "0", "--texts", "essays"])
    assert args.budgets == [256, 512] and args.seeds == [0] and args.texts == ["essays"]
    with pytest.raises(SystemExit):
        build_parser("longgen").parse_args(["longgen", "--seeds", "-1"])


# ---- the recall task: a long greedy answer with a checkable result -------------------------------------------------
def _recall_material():
    from tiny_lm import tiny_lm
    from tokenfilter.longctx.ruler import WordsError, wikitext_words

    try:
        wikitext_words()
    except WordsError as exc:
        pytest.skip(str(exc))
    return tiny_lm()


def test_recall_prompts_are_fixed_by_the_seed_and_end_with_the_first_line():
    from tokenfilter.longctx.recall import MARGIN, recall_samples

    _, tok = _recall_material()
    a, b = recall_samples(tok, 6, 2, seed=3), recall_samples(tok, 6, 2, seed=3)
    assert [s.ids.tolist() for s in a] == [s.ids.tolist() for s in b]
    assert a[0].ids.tolist() != a[1].ids.tolist()  # two different lists
    text = tok.decode(a[0].ids[0])
    first = text.split("\n\n")[1].splitlines()[0]
    assert text.endswith(first + "\n") and first.startswith("1. ")
    assert len(a[0].references) == 5 and all(r in text for r in a[0].references)  # each is in the list, read back
    body = "\n".join([first, *a[0].references])
    assert a[0].max_new == len(tok(body).input_ids) + MARGIN
    with pytest.raises(ValueError, match="at least 2 records"):
        recall_samples(tok, 1, 1)


def test_recall_scores_the_answer_by_string_match(monkeypatch):
    """The score is the share of the other records whose whole line is in the decoded answer."""
    import tokenfilter.longctx.recall as recall

    model, tok = _recall_material()
    sample = recall.recall_samples(tok, 5, 1, seed=1)[0]
    half = "\n".join(sample.references[:2]) + "\n" + sample.references[2][:-1]  # the third line cut short
    monkeypatch.setattr(recall, "greedy_answer", lambda m, s, cfg: (torch.tensor(tok(half).input_ids), None))
    (res,) = recall.run_recall(model, tok, [sample], [Row("dense", "dense", None)])
    assert res.score == pytest.approx(2 / 4)


def test_recall_runs_every_row_under_its_filter_and_resumes(tmp_path, monkeypatch):
    import tokenfilter.longctx.recall as recall

    model, tok = _recall_material()
    rows = recall.recall_rows(plan_rows([0.5], [24], [0, 1], presses=["KnormPress"], recent=8))
    names = [r.name for r in rows]
    assert "budget-24-random-seed0" in names and "budget-24-random-seed1" not in names
    assert not any(n.startswith("kvpress") for n in names)
    path = tmp_path / "recall.json"
    results = recall.run_recall_file(model, tok, rows, 6, 1, path, {"model": "tiny"})
    assert [r.row for r in results] == names
    got = {r.row: r for r in results}
    assert got["dense"].kv_held == 1.0 and got["dense"].peak_held is None
    assert got["budget-24"].peak_held == 24 and got["budget-24"].tokens > 24  # the budget held under generate
    assert got["dense"].realized == 0 and 0 < got["token-filter-0.5"].realized < 1
    assert all(0 <= r.score <= 1 for r in results)
    calls = []
    monkeypatch.setattr(recall, "greedy_answer", lambda *a: calls.append(a))
    again = recall.run_recall_file(model, tok, rows, 6, 1, path, {"model": "tiny"}, resume=True)
    assert not calls and [r.seconds for r in again] == [r.seconds for r in results]
    table = recall.render_recall(again, rows)
    assert "| budget-24 |" in table and "| dense | " in table


def test_the_command_writes_each_part_and_assembles_them_with_resume(tiny_dir, tmp_path, capsys):
    """Parts run alone write their own files; a later ``--resume`` run of all parts measures nothing again."""
    from tokenfilter.cli import main

    _recall_material()
    out, md = tmp_path / "out", tmp_path / "doc.md"
    argv = ["longgen", "--model", str(tiny_dir), "--prompt", "40", "--continuation", "60", "--texts", "wikitext",
            "--ratios", "0.5", "--budgets", "60,80,90", "--seeds", "0", "--presses", "none", "--recall-samples", "1",
            "--recall-records", "3", "--output", str(out)]
    assert main([*argv, "--parts", "ppl"]) == 0
    assert (out / "longgen.json").exists() and not (out / "recall.json").exists()
    assert main([*argv, "--parts", "memory,recall"]) == 0
    memory = json.loads((out / "memory.json").read_text())["rows"]
    assert [r["name"] for r in memory] == ["dense", "token-filter-0.5", "budget-80"]  # the middle ratio and budget
    assert memory[2]["kv_end"] < memory[0]["kv_end"]
    assert memory[0]["realized"] is None and 0 < memory[1]["realized"] < 1  # greedy tokens, the ratio's controller
    assert f"| token-filter-0.5 | {memory[1]['realized']:.3f} |" in (out / "longgen.md").read_text()
    def measured() -> dict:
        return {p: json.loads((out / p).read_text()).get("results") or json.loads((out / p).read_text())["rows"]
                for p in ("longgen.json", "memory.json", "recall.json")}

    saved = measured()
    capsys.readouterr()
    assert main([*argv, "--resume", "--results-md", str(md)]) == 0
    assert measured() == saved  # nothing measured again (the seconds would differ)
    text = md.read_text()
    for part in ("Perplexity:", "Memory:", "Recall:", "| budget-80 |", "| streamingllm-80 |"):
        assert part in text, part
    with pytest.raises(SystemExit):
        build_parser("longgen").parse_args(["longgen", "--parts", "ppl,speed"])


def test_recent_shares_add_each_budget_with_that_window():
    rows = {r.name: r for r in plan_rows([], [512], [0], recent_shares=[0.5, 0.0625])}
    assert rows["budget-512-recent256"].filter.window == 256 and rows["budget-512-recent32"].filter.window == 32
    assert rows["budget-512"].filter.window == 384  # the default: 3/4 of the budget
    args = build_parser("longgen").parse_args(["longgen", "--texts", "wikitext-sel,essays-sel", "--ratios", ""])
    assert args.ratios == [] and args.texts == ["wikitext-sel", "essays-sel"]


def test_the_selection_texts_are_not_the_reported_ones():
    from tokenfilter.longctx import longgen_cli

    try:
        got = longgen_cli.texts(["wikitext", "essays", "wikitext-sel", "essays-sel"])
    except (FileNotFoundError, OSError) as exc:
        pytest.skip(str(exc))
    assert got["wikitext-sel"][-2000:] not in got["wikitext"] and got["wikitext"][:2000] not in got["wikitext-sel"]
    reported_essays = got["essays"][:40_000]  # far more than 4,608 tokens
    assert got["essays-sel"][:2000] not in reported_essays
    with pytest.raises(ValueError, match="Unknown text"):
        longgen_cli.texts(["books"])


def test_runs_of_different_rows_add_up_and_other_settings_are_refused(tmp_path):
    """Two processes measuring different rows into one folder keep both (the doc's table comes from one --resume
    run over them); a --resume on other texts stops before it measures or overwrites anything."""
    model = make_tiny("llama")
    seqs = {"a": random_ids(1, 90, seed=15)}
    ratio_rows, budget_rows = plan_rows([0.4], [], [0], recent=8), plan_rows([], [40], [], recent=8)
    run_longgen(model, seqs, 30, ratio_rows, tmp_path, chunk=30, meta={"model": "tiny"})
    run_longgen(model, seqs, 30, budget_rows, tmp_path, chunk=30, meta={"model": "tiny"})
    saved = {r["row"] for r in json.loads((tmp_path / "longgen.json").read_text())["results"]}
    assert saved == {r.name for r in ratio_rows + budget_rows}
    before = (tmp_path / "longgen.json").read_text()
    with pytest.raises(ValueError, match="other texts, lengths or model"):
        run_longgen(model, {"b": random_ids(1, 90, seed=16)}, 30, budget_rows, tmp_path, meta={"model": "tiny"},
                    resume=True)
    assert (tmp_path / "longgen.json").read_text() == before
    assert build_parser("longgen").parse_args(["longgen", "--budgets", ""]).budgets == []


def test_a_kvpress_row_shows_no_realized_ratio():
    from tokenfilter.longctx.longgen import Result

    rows = plan_rows([], [64], [], presses=["KnormPress"], recent=8)
    results = [Result("t", r.name, 10.0, 1.0, 4, 0.0 if r.peer else 0.5, 0.5, 64, 1.0) for r in rows]
    lines = {line.split(" | ")[0]: line for line in render_markdown(results, rows, {}).splitlines()}
    assert "| 10.000 (x1.000) | - | 0.500 | 64 |" in lines["| kvpress-KnormPress-64"]
    assert "| 0.500 | 0.500 | 64 |" in lines["| budget-64"]
