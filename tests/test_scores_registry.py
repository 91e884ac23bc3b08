"""Every registered score through the same invariants (kvpress's test-matrix style): the function alone, then
the engine with it."""

from __future__ import annotations

import pytest
import torch

from test_engine_equivalence import logits
from tokenfilter import TokenFilter
from tokenfilter.algorithm.scores import SCORES, ScoreState

from conftest import BACKENDS, assert_ran_and_kept_everything, left_pad, make_tiny, random_ids

NAMES = sorted(SCORES)
DRAWS = {"random"}  # scores whose values depend on the order of their draws
# scores whose values depend on how the calls split the tokens: the draws, and the scores standardized with the
# statistics of each call's tokens (tokenfilter.algorithm.scores.standardized)
PER_CALL = DRAWS | {"standardized-min", "standardized-mean"}


def _state(valid, seed=0, seen=None, b=2, fusion="variance"):
    return ScoreState(
        valid=valid,
        seen=torch.zeros(b, dtype=torch.long) if seen is None else seen,
        memory={},
        generator=torch.Generator().manual_seed(seed),
        params={"gamma": 0.9, "fusion": fusion, "lam": 1.0},
    )


def _kv(b=2, n=11, h=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, h, d, generator=g), torch.randn(b, n, h, d, generator=g)


@pytest.mark.parametrize("name", NAMES)
def test_score_function_shape_and_determinism(name):
    keys, values = _kv()
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, 6:] = False  # row 1 has 6 real tokens, then padding (left-aligned, as the engine passes them)
    a = SCORES[name](keys, values, _state(valid))
    b = SCORES[name](keys, values, _state(valid))
    assert a.shape == (2, 11) and a.dtype == torch.float32
    assert torch.isfinite(a[valid]).all()
    assert torch.equal(a, b), "same inputs and seed, same scores"
    # padding entries never change the real ones
    noisy = keys.clone()
    noisy[1, 6:] = 1e3
    c = SCORES[name](noisy, values, _state(valid))
    assert torch.equal(c[valid], a[valid])


KEY_FUSED = [("cumulative-mean", "key"), ("cumulative-mean", "key-min"), ("two-horizon", "key")]


@pytest.mark.parametrize("name,fusion", [(n, "variance") for n in sorted(set(NAMES) - PER_CALL)] + KEY_FUSED)
def test_score_state_carries_across_calls(name, fusion):
    """Scoring a sequence in two calls (the state kept in ``memory``) gives one call's scores."""
    keys, values = _kv(n=12)
    whole = SCORES[name](keys, values, _state(None, fusion=fusion))
    state = _state(None, fusion=fusion)
    first = SCORES[name](keys[:, :5], values[:, :5], state)
    state.seen = torch.full((2,), 5)
    second = SCORES[name](keys[:, 5:], values[:, 5:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,fusion", [(n, "variance") for n in NAMES] + KEY_FUSED)
def test_every_score_through_the_engine(name, fusion):
    # not qwen3: its tiny random k-norm (weight 1) gives every key the same norm, so key-norm would rank ties
    model = make_tiny("llama")
    ids, mask = left_pad([random_ids(1, 70, seed=2)[0], random_ids(1, 64, seed=3)[0]])
    # guarantee 1 for scores not bounded by 1: a threshold above every score filters nothing, bit for bit. Not
    # threshold=inf alone, under which no layer is patched (nothing to score): the scores recorded under it (a
    # layer is patched to record them) give a finite threshold above all of them, and the layers then run the
    # score and the KV-side path, keep every token and give the unmodified model's bits (as measured on the CPU)
    dense = logits(model, ids)
    with TokenFilter(threshold=float("inf"), score=name, fusion=fusion, record_decisions=True).apply(model) as run:
        assert torch.equal(logits(model, ids), dense)
    assert_ran_and_kept_everything(run)
    above_all = max(float(run.scores[layer].max()) for layer in run.filtered_layers) + 1.0
    for record in (False, True):
        cfg = TokenFilter(threshold=above_all, score=name, fusion=fusion, record_decisions=record)
        with cfg.apply(model) as run:
            assert torch.equal(logits(model, ids), dense)
        assert_ran_and_kept_everything(run)
    results = {}
    for path in BACKENDS:
        cfg = TokenFilter(ratio=0.5, score=name, fusion=fusion, skip="none", recent=4, path=path,
                          record_decisions=True)
        with cfg.apply(model) as run:
            out = logits(model, ids, mask)
            with torch.no_grad():
                model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        results[path] = (out, run.decisions, run.scores, run.stats)
        assert abs(run.stats.ratio - 0.5) <= 0.02 + 4 * 0.5 / 134  # the 4 decoded steps use the running quantile
        for layer in run.filtered_layers:
            s = run.scores[layer][:, : ids.shape[1]]
            assert s[~mask.bool()].isnan().all(), "padding has no score"
            assert torch.isfinite(s[mask.bool()]).all()
    real = mask.bool()
    for path in BACKENDS[1:]:  # every backend as the first
        first, other = results[BACKENDS[0]], results[path]
        torch.testing.assert_close(other[0][real], first[0][real], atol=1e-5, rtol=1e-5)
        assert all(torch.equal(a, b) for a, b in zip(other[1], first[1], strict=True))


def test_unknown_score_names_the_registry():
    with pytest.raises(ValueError, match="score must be one of .*similarity"):
        TokenFilter(ratio=0.5, score="attention-received")


def test_key_fusions_score_the_keys_alone():
    """Under a fusion of the keys alone the values never change a score, and the cumulative mean keeps the keys'
    sums only."""
    keys, values = _kv(n=12)
    for name, fusion in KEY_FUSED:
        state = _state(None, fusion=fusion)
        a = SCORES[name](keys, values, state)
        b = SCORES[name](keys, torch.randn_like(values), _state(None, fusion=fusion))
        assert torch.equal(a, b)
        assert all(m.shape[1] == 1 for m in state.memory.values())  # the keys' anchors and sums only
    # the keys' anchors and sums are the key half of those kept with the values, bit for bit
    alone, with_values = _state(None, fusion="key"), _state(None, fusion="mean")
    SCORES["two-horizon"](keys, values, alone)
    SCORES["two-horizon"](keys, values, with_values)
    for name in ("anchors", "sum"):
        assert torch.equal(alone.memory[name][:, 0], with_values.memory[name][:, 0])
    both = SCORES["cumulative-mean"](keys, values, _state(None, fusion="mean"))
    assert not torch.equal(both, SCORES["cumulative-mean"](keys, torch.randn_like(values), _state(None, fusion="mean")))


def test_min_fusion_lets_the_most_novel_head_decide():
    from tokenfilter.algorithm.scores import fuse

    g = torch.Generator().manual_seed(3)
    s_k, s_v = torch.rand(5, 4, generator=g), torch.rand(5, 4, generator=g)
    fused = fuse(s_k, s_v, "min", 1.0)
    assert torch.allclose(fused, (s_k.amin(-1) + s_v.amin(-1)) / 2)
    assert (fused <= fuse(s_k, s_v, "mean", 1.0) + 1e-7).all()  # never more redundant than the mean head
    s_k[2, 1] = -1.0  # one head finds token 2 wholly novel
    assert fuse(s_k, s_v, "min", 1.0).argmin() == 2
    assert torch.equal(fuse(s_k, s_v, "key-min", 1.0), s_k.amin(-1))  # the keys alone: values never count
    assert fuse(s_k, s_v.neg(), "key-min", 1.0).argmin() == 2


def test_kv_min_fusion_filters_only_what_key_and_value_both_repeat():
    from tokenfilter.algorithm.scores import fuse

    g = torch.Generator().manual_seed(4)
    s_k, s_v = torch.rand(5, 4, generator=g) * 0.5 + 0.5, torch.rand(5, 4, generator=g) * 0.5 + 0.5
    fused = fuse(s_k, s_v, "kv-min", 1.0)
    assert torch.equal(fused, torch.minimum(s_k.mean(-1), s_v.mean(-1)))
    s_v[3] = -1.0  # token 3's value is novel though its key is not: it is the least redundant
    assert fuse(s_k, s_v, "kv-min", 1.0).argmin() == 3 and fuse(s_k, s_v, "key", 1.0).argmin() != 3


def test_two_horizon_is_redundant_only_on_both_horizons():
    keys, values = _kv(n=12)
    both = SCORES["two-horizon"](keys, values, _state(None))
    short = SCORES["similarity"](keys, values, _state(None))
    long = SCORES["cumulative-mean"](keys, values, _state(None))
    assert torch.equal(both, torch.minimum(short, long))
    # a rare token said three times after a long past: the EMA has moved to it, the mean of the whole past has not
    keys, values = _kv(n=40, seed=1)
    keys[:, 31:33], values[:, 31:33] = keys[:, 30:31], values[:, 30:31]
    ema, mean = SCORES["similarity"](keys, values, _state(None)), SCORES["cumulative-mean"](keys, values, _state(None))
    assert (ema[:, 32] > mean[:, 32]).all()
    assert torch.equal(SCORES["two-horizon"](keys, values, _state(None))[:, 32], mean[:, 32])


def _z(seen: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``s`` against the mean and population variance of ``seen`` (each ``[..., P]``), in float64."""
    seen = seen.double()
    return (s.double() - seen.mean(0)) / (seen.var(0, unbiased=False) + 1e-6).sqrt()


@pytest.mark.parametrize("prefix", [False, True])
def test_standardize_uses_each_parts_statistics(prefix):
    from tokenfilter.algorithm.scores.standardized import standardize

    g = torch.Generator().manual_seed(5)
    s = torch.rand(2, 9, 2, generator=g)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 5:] = False  # row 1: five real entries, then padding
    s[1, 5:] = float("nan")
    state = _state(valid)
    z = standardize(s.clone(), state, prefix=prefix)
    for row, n in ((0, 9), (1, 5)):
        for t in range(n):  # the part's similarities up to and including t, or all of the call's
            torch.testing.assert_close(z[row, t].double(), _z(s[row, : (t + 1 if prefix else n)], s[row, t]),
                                       atol=1e-4, rtol=1e-4)
    if prefix:
        assert (z[:, 0] == 0).all()  # no spread yet
    # the next call (one decode token per row) reads every real token so far, this one included
    nxt = torch.rand(2, 1, 2, generator=g)
    state.valid, state.seen = None, torch.tensor([9, 5])
    z = standardize(nxt, state, prefix=prefix)
    for row, n in ((0, 9), (1, 5)):
        torch.testing.assert_close(z[row, 0].double(), _z(torch.cat([s[row, :n], nxt[row]]), nxt[row, 0]),
                                   atol=1e-4, rtol=1e-4)


def test_standardized_min_compares_key_and_value_on_a_common_scale():
    from tokenfilter.algorithm.scores.standardized import standardize

    g = torch.Generator().manual_seed(6)
    s = torch.stack([0.9 + 0.02 * torch.rand(1, 40, generator=g), 0.3 + 0.02 * torch.rand(1, 40, generator=g)], -1)
    s[0, 30, 0] = 0.6  # token 30's key is novel; its value is as usual, and the values run far lower than the keys
    # a raw minimum reads the values alone and misses it; on a common scale the novel key decides
    assert s.amin(-1)[0, 30] > s.amin(-1)[0, 20:].min()
    for prefix in (False, True):
        assert standardize(s, _state(None, b=1), prefix=prefix).amin(-1)[0].argmin() == 30


def test_standardized_scores_read_the_two_horizon_similarities():
    from tokenfilter.algorithm.scores.standardized import part_similarities, standardize

    keys, values = _kv(n=12)
    parts = part_similarities(keys, values, _state(None))
    for i, fusion in enumerate(("key", "value")):  # each part: the two-horizon score of that part alone
        torch.testing.assert_close(parts[..., i], SCORES["two-horizon"](keys, values, _state(None, fusion=fusion)))
    z = standardize(parts, _state(None))
    assert torch.equal(SCORES["standardized-min"](keys, values, _state(None)), z.amin(-1))
    assert torch.equal(SCORES["standardized-mean"](keys, values, _state(None)), z.mean(-1))
    z = standardize(parts, _state(None), prefix=True)
    assert torch.equal(SCORES["standardized-min-prefix"](keys, values, _state(None)), z.amin(-1))
