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
