"""``TokenFilter(budget=N)``: each filtered layer holds at most N entries per sequence (docstring of ``TokenFilter``,
``Visibility``). The guarantees of the other modes, under a budget: the read rule equals online eviction step by
step, fast == reference, chunked == one call, padded == alone, exact KV accounting; and the limits it reduces to
(a budget above the input: the unmodified model; a constant score: StreamingLLM's window)."""

from __future__ import annotations

import pytest
import torch

from tokenfilter import TokenFilter
from tokenfilter.algorithm.visibility import Visibility
from tokenfilter.integration.kv_store import BudgetKV

from conftest import FAMILIES, left_pad, make_tiny, positions, random_ids, right_pad

PATHS = ("fast", "reference")


def logits(model, ids, mask=None, **kw) -> torch.Tensor:
    pos = positions(mask) if mask is not None else None
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=pos, **kw).logits


def online_eviction(scores: list[float], sinks: int, recent: int, slots: int) -> list[set[int]]:
    """The budget as a loop: what token t reads (sinks, its band, the held slots); after it, the key leaving the band
    joins the slots and, past ``slots``, the held key with the highest score leaves (between equals, the older)."""
    held: list[int] = []
    reads = []
    for t in range(len(scores)):
        band = {j for j in range(max(0, t - recent + 1), t + 1)}
        reads.append({j for j in range(min(sinks, t + 1))} | band | set(held))
        leaving = t - recent + 1
        if leaving >= sinks:
            held.append(leaving)
            if len(held) > slots:
                held.remove(max(held, key=lambda j: (scores[j], -j)))
    return reads


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sinks,recent,slots", [(2, 3, 4), (1, 1, 3), (4, 8, 0), (3, 2, 10)])
def test_read_rule_is_online_eviction(seed, sinks, recent, slots):
    g = torch.Generator().manual_seed(seed)
    n = 40
    scores = torch.randint(0, 6, (n,), generator=g).float()  # many ties
    vis = Visibility(filtered_reads=True, filtered_stored=False, recent=recent, sinks=sinks, window=None, slots=slots)
    idx = torch.arange(n)[None]
    allowed = vis.allowed(idx, idx, idx, idx, torch.ones(1, n, dtype=torch.bool), None, scores[None])[0]
    expected = online_eviction(scores.tolist(), sinks, recent, slots)
    for t in range(n):
        assert set(allowed[t].nonzero().flatten().tolist()) == expected[t], f"query {t}"
        assert len(expected[t]) <= sinks + recent + slots
    held = vis.held(torch.tensor([n]), idx, scores[None], torch.ones(1, n, dtype=torch.bool))[0]
    assert int(held.sum()) == min(n, sinks + recent - 1 + slots)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", [20, 45])
def test_fast_equals_reference_and_holds_the_budget(family, budget):
    model = make_tiny(family)
    ids = random_ids(2, 150)
    out, stats, caches = {}, {}, {}
    for path in PATHS:
        with TokenFilter(budget=budget, recent=8, path=path).apply(model) as run:
            result = model(ids, use_cache=True)
            out[path], stats[path], caches[path] = result.logits, run.stats, result.past_key_values
    torch.testing.assert_close(out["fast"], out["reference"], rtol=1e-4, atol=1e-5)
    fast, ref = stats["fast"], stats["reference"]
    assert fast.ratio == ref.ratio > 0 and fast.kv_held_fraction == ref.kv_held_fraction
    # a budget above Mistral's own 24-token window holds more than the unmodified model (its latest 23 tokens):
    # a budget does not evict what the window has passed (the KV side does)
    assert (fast.kv_held_fraction < 1) != (family == "mistral" and budget > 23)
    assert fast.pairs_fraction == ref.pairs_fraction < 1
    for layer in range(model.config.num_hidden_layers):
        peak = fast.peak_held_per_layer[layer]
        assert peak == ref.peak_held_per_layer[layer]
        store = caches["fast"].layers[layer]
        if peak is None:  # a layer before start_layer: dense
            continue
        assert peak == budget  # 150 tokens fill it
        kv = store.kv
        assert isinstance(kv, BudgetKV)
        held = kv.valid.sum(-1)  # a direct count of the cache
        assert held.tolist() == [budget, budget] and kv.keys.shape[2] == budget + 1  # a slot for the next token
        assert fast.layers[layer].kv_dropped == 2 * 150 - int(held.sum())


@pytest.mark.parametrize("path", PATHS)
def test_chunked_and_token_by_token_equal_one_call(path):
    model = make_tiny("qwen2")
    ids = random_ids(1, 120, seed=3)
    cfg = TokenFilter(budget=30, recent=6, path=path)
    with cfg.apply(model) as run:
        whole = logits(model, ids)
        whole_stats = run.stats
    with cfg.apply(model) as run:
        cache, parts = None, []
        for s, e in ((0, 50), (50, 51), (51, 100), (100, 120)):
            with torch.no_grad():
                r = model(ids[:, s:e], past_key_values=cache, use_cache=True)
            cache = r.past_key_values
            parts.append(r.logits)
        chunked_stats = run.stats
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-4, atol=1e-5)
    assert chunked_stats.kv_held_fraction == whole_stats.kv_held_fraction
    assert chunked_stats.peak_held_per_layer == whole_stats.peak_held_per_layer
    with cfg.apply(model) as run:  # a decode of the same tokens, one by one
        cache, steps = None, []
        for t in range(ids.shape[1]):
            with torch.no_grad():
                r = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache, _ = r.past_key_values, steps.append(r.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_left_padded_batch_equals_alone(path):
    model = make_tiny("llama")
    seqs = [random_ids(1, n, seed=s)[0] for n, s in ((90, 4), (64, 5), (75, 6))]
    ids, mask = left_pad(seqs)
    cfg = TokenFilter(budget=25, recent=8, path=path)
    with cfg.apply(model) as run:
        batch = logits(model, ids, mask)
        with torch.no_grad():
            batch_gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert max(p for p in run.stats.peak_held_per_layer if p is not None) == 25
        for i, s in enumerate(seqs):
            alone = logits(model, s[None])
            torch.testing.assert_close(batch[i, -len(s) :], alone[0], rtol=1e-4, atol=1e-5)
            with torch.no_grad():
                gen = model.generate(s[None], max_new_tokens=6, do_sample=False)
            assert torch.equal(batch_gen[i, -6:], gen[0, -6:])


@pytest.mark.parametrize("path", PATHS)
def test_right_padded_batch_equals_alone(path):
    """Right padding (lm-eval's batches): the real tokens' logits and each row's greedy continuation equal the row
    alone; the padding columns are computed (over what the row holds) and agree between the two paths."""
    model = make_tiny("llama")
    seqs = [random_ids(1, n, seed=s)[0] for n, s in ((90, 4), (64, 5), (75, 6))]
    ids, mask = right_pad(seqs)
    cfg = TokenFilter(budget=25, recent=8, path=path)
    with cfg.apply(model) as run:
        batch = logits(model, ids, mask)
        assert max(p for p in run.stats.peak_held_per_layer if p is not None) == 25
        for i, s in enumerate(seqs):
            torch.testing.assert_close(batch[i, : len(s)], logits(model, s[None])[0], rtol=1e-4, atol=1e-5)
    with cfg.replace(path="reference" if path == "fast" else "fast").apply(model):
        other = logits(model, ids, mask)
    torch.testing.assert_close(batch, other, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_a_budget_above_the_input_is_the_unmodified_model(path):
    model = make_tiny("mistral")  # its own 24-token window applies on top
    ids = random_ids(2, 60, seed=7)
    dense = logits(model, ids)
    with TokenFilter(budget=64, recent=8, path=path).apply(model) as run:
        out = logits(model, ids)
    assert run.filtered_layers and run.stats.ratio == 0
    # a filtered layer held all 60 tokens (a budget keeps what the window passed), the unmodified model's its latest 23
    layers, filtered = model.config.num_hidden_layers, len(run.filtered_layers)
    assert run.stats.kv_held_fraction == pytest.approx((60 * filtered + 23 * (layers - filtered)) / (23 * layers))
    assert [p for p in run.stats.peak_held_per_layer if p is not None] == [60] * len(run.filtered_layers)
    torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-5)


def test_a_constant_score_is_streamingllm():
    """Equal scores: the older key leaves first, so a budget N holds the sinks and the latest N - sinks tokens."""
    model = make_tiny("qwen3")
    ids = random_ids(1, 100, seed=8)
    with TokenFilter(budget=30, recent=5, score="constant", start_layer=0).apply(model) as run:
        out = logits(model, ids)
    with TokenFilter.sliding_window(recent=30 - 4 + 1).apply(model) as window:
        expected = logits(model, ids)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert run.stats.kv_held_fraction == window.stats.kv_held_fraction


def test_generate_holds_the_budget():
    model = make_tiny("llama")
    ids = random_ids(1, 40, seed=9)
    with TokenFilter(budget=32, recent=8).apply(model) as run, torch.no_grad():
        out = model.generate(ids, max_new_tokens=60, min_new_tokens=60, do_sample=False)
    assert out.shape[1] == 100
    held = [p for p in run.stats.peak_held_per_layer if p is not None]
    assert held and all(p == 32 for p in held)
    # every filtered layer holds 32 of the 99 entries written (the last token's is never written)
    for layer in run.filtered_layers:
        assert run.stats.layers[layer].kv_dropped == 99 - 32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(budget=64, ratio=0.5), "one of ratio, threshold or budget"),
        (dict(budget=40, recent=64), "below the 67 entries"),
        (dict(budget=3), "below the 4 entries"),
        (dict(budget=100, skip="attention", recent=None), 'skip="none"'),
        (dict(budget=100, granularity="head"), 'granularity="token"'),
        (dict(budget=100.5), "whole number"),
    ],
)
def test_budget_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenFilter(**kwargs)


def test_the_auto_window_is_three_quarters_of_the_budget():
    """recent="auto" under a budget: 3/4 of it, at most what the budget leaves after the sinks; results record the
    window itself (before this rule, "auto" meant 64 under a budget too)."""
    assert TokenFilter(budget=1024).window == 768 and TokenFilter(budget=512).window == 384
    assert TokenFilter(budget=8).window == 5  # 6 would need 4 + 6 - 1 = 9 entries
    assert TokenFilter(budget=1024, recent=64).window == 64 and TokenFilter(ratio=0.5).window == 64
    assert TokenFilter(budget=1024).as_record()["recent"] == 768
    assert TokenFilter(ratio=0.5).as_record()["recent"] == "auto"


def test_replace_switches_modes():
    cfg = TokenFilter(ratio=0.5)
    assert cfg.replace(budget=128).mode == "budget" and cfg.replace(budget=128).ratio is None
    assert TokenFilter(budget=128).replace(ratio=0.3).budget is None
    assert "budget" not in repr(cfg) and "budget=128" in repr(TokenFilter(budget=128))
