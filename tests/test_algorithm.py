"""Unit tests of the algorithm pieces: schedule, anchors, fusion, decision rules."""

from __future__ import annotations

import pytest
import torch

from tokenfilter.algorithm.anchors import ema_scan, sum_scan
from tokenfilter.algorithm.decisions import top_ratio
from tokenfilter.algorithm.schedule import resolve
from tokenfilter.algorithm.scores import fuse


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.3, 0.45, 0.5, 0.7])
@pytest.mark.parametrize("layers", [5, 30])
def test_tail_linear_water_filling(ratio, layers):
    sched = resolve("tail-linear", ratio, layers, None, 0.95)
    r = sched.ratios
    assert sum(r) / layers == pytest.approx(ratio, abs=1e-9)
    assert max(r) <= 0.95 + 1e-12
    assert all(x == 0 for x in r[: sched.start])
    tail = r[sched.start :]
    assert all(a <= b + 1e-12 for a, b in zip(tail, tail[1:], strict=False)), "non-decreasing ramp"
    assert sched.start <= layers // 2


@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.5, 0.7])
@pytest.mark.parametrize("layers", [5, 30])
def test_front_linear_mirrors_the_tail_ramp(ratio, layers):
    front = resolve("front-linear", ratio, layers, 2, 0.95)
    tail = resolve("tail-linear", ratio, layers, 2, 0.95)
    r = front.ratios
    assert sum(r) / layers == pytest.approx(ratio, abs=1e-9) and max(r) <= 0.95 + 1e-12
    assert front.start == tail.start and all(x == 0 for x in r[: front.start])
    ramp = r[front.start :]
    assert all(a >= b - 1e-12 for a, b in zip(ramp, ramp[1:], strict=False)), "non-increasing ramp"
    assert ramp == pytest.approx(tail.ratios[tail.start :][::-1])  # the same ramp, the other way round


def test_tail_extends_when_the_cap_binds():
    sched = resolve("tail-linear", 0.6, 10, None, 0.95)  # 5 tail layers x 0.95 = 4.75 < 6
    assert sched.start < 5
    assert sum(sched.ratios) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="above max_layer_ratio"):
        resolve("tail-linear", 0.96, 10, None, 0.95)


def test_uniform_and_explicit():
    u = resolve("uniform", 0.25, 8, 4, 0.95)
    assert u.ratios == (0, 0, 0, 0, 0.5, 0.5, 0.5, 0.5)
    e = resolve([0, 0.1, 0.2], 0.1, 3, None, 0.95)
    assert e.ratios == (0, 0.1, 0.2) and e.start == 1


def test_ema_scan_matches_recurrence():
    torch.manual_seed(0)
    x = torch.randn(2, 150, 3, 4)
    init = torch.randn(2, 3, 4)
    got = ema_scan(x, init, 0.9)
    a = init.clone()
    for t in range(150):  # blocks of 32 and a ragged last block
        a = 0.9 * a + 0.1 * x[:, t]
        torch.testing.assert_close(got[:, t], a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 20, 32, 150, 2048])  # one token, one block, exact blocks, a ragged last block
def test_sum_scan_is_the_running_sum(n):
    """The blocked running sum (two-horizon's long horizon) equals a float64 cumulative sum to float rounding; a
    single token is the step's own ``before + x``, bit for bit."""
    torch.manual_seed(n)
    x, init = torch.randn(2, n, 3, 4), torch.randn(2, 3, 4)
    got = sum_scan(x, init)
    want = init.double()[:, None] + x.double().cumsum(1)
    torch.testing.assert_close(got.double(), want, atol=1e-4 * n**0.5, rtol=1e-5)
    if n == 1:
        assert torch.equal(got[:, 0], init + x[:, 0])


def test_fusion_variance_prefers_consistent_signal():
    s_k = torch.tensor([[0.9, 0.9, 0.9, 0.9]])  # heads agree
    s_v = torch.tensor([[0.1, 0.9, 0.1, 0.9]])  # heads disagree
    fused = fuse(s_k, s_v, "variance", lam=1.0)
    assert fused.item() == pytest.approx(0.9, abs=1e-3)  # almost all weight on K, which has no spread
    assert fuse(s_k, s_v, "mean", 1.0).item() == pytest.approx(0.7)
    # disagreement lowers the score of V alone by lam * sigma
    assert fuse(s_v, s_v, "variance", lam=1.0).item() == pytest.approx(0.5 - 0.4)


def test_top_ratio_counts_and_eligibility():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]])
    eligible = torch.ones(1, 10, dtype=torch.bool)
    eligible[0, :2] = False
    out = top_ratio(scores, eligible, torch.tensor([10]), 0.3)
    assert out.tolist() == [[False, False, True, True, True, False, False, False, False, False]]
    # never more than the eligible tokens
    out = top_ratio(scores, eligible, torch.tensor([10]), 0.9)
    assert int(out.sum()) == 8


def _assert_quantiles_match(layer, raw: list[list[float]]) -> None:
    hist = torch.full((len(raw), max(map(len, raw)) or 1), float("nan"))
    for r, vals in enumerate(raw):
        hist[r, : len(vals)] = torch.tensor(vals)
    for level in (0.0, 0.3, 0.5, 0.7, 0.95, 1.0):
        want = torch.nanquantile(hist, level, dim=-1, keepdim=True)
        got = layer.quantile(level)
        assert torch.equal(got.isnan(), want.isnan())
        torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), atol=0, rtol=0)


@pytest.mark.parametrize(("ragged", "rows"), [(True, 3), (False, 3), (False, 1)])
def test_sorted_score_history_quantile_equals_nanquantile(ragged, rows):
    """``ScoreHistory`` keeps each row's scores sorted so decode reads the quantile without sorting; it must give
    exactly what ``torch.nanquantile`` gives on the unsorted history, for ragged rows (a padded batch: ranks
    computed per row) and equal rows (ranks computed in Python); one row takes the in-place insertion."""
    from tokenfilter.algorithm.decisions import ScoreHistory

    torch.manual_seed(0)
    layer = ScoreHistory(rows, torch.device("cpu"))
    raw: list[list[float]] = [[] for _ in range(rows)]
    _assert_quantiles_match(layer, raw)  # empty: NaN everywhere
    if ragged:
        eligible = torch.tensor([[True] * 5, [True, False, True, False, False], [False] * 5])
    else:
        eligible = torch.ones(rows, 5, dtype=torch.bool)
    for _ in range(2):  # two prefill chunks
        scores = torch.rand(rows, 5)
        layer.add(scores, eligible)
        for r in range(rows):
            raw[r] += scores[r][eligible[r]].tolist()
        _assert_quantiles_match(layer, raw)
    assert (layer.shortest == layer.longest) != ragged
    for _ in range(70):  # decode steps: one score inserted per row, ties included, across a buffer growth
        s = torch.rand(rows).round(decimals=1)
        layer.add(s[:, None], None)
        for r in range(rows):
            raw[r].append(float(s[r]))
        _assert_quantiles_match(layer, raw)


def test_anchor_weights_cached_in_inference_mode_serve_autograd():
    """The EMA scan's cached weights, first built under ``torch.inference_mode``, still serve a forward with autograd
    (an inference tensor cannot be saved for backward)."""
    from tokenfilter.algorithm import anchors

    anchors._weights.cache_clear()
    with torch.inference_mode():
        anchors.ema_scan(torch.randn(1, 70, 2, 4), torch.zeros(1, 2, 4), 0.93)
    x = torch.randn(1, 70, 2, 4, requires_grad=True)
    anchors.ema_scan(x, torch.zeros(1, 2, 4), 0.93).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
