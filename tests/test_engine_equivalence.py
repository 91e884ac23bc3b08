"""SPEC guarantees 1-4: identity when nothing is filtered, prefill == decode, fast == reference, padding.

These run on ``TOKENFILTER_TEST_DEVICE`` in ``TOKENFILTER_TEST_DTYPE`` (conftest; default: CPU, float32): the
models and inputs here are moved there, and "same logits" means ``TEST_TOL`` of that dtype.
"""

from __future__ import annotations

import pytest
import torch

from tokenfilter import TokenFilter

import conftest
from conftest import (
    BACKENDS,
    FAMILIES,
    TEST_DEVICE,
    TEST_EXACT,
    TEST_FP32,
    TEST_TOL,
    assert_ran_and_kept_everything,
    make_tiny,
    on_test_device,
    positions,
)

OTHER_BACKENDS = [b for b in BACKENDS if b != "reference"]  # each checked against the reference (masking) path


@pytest.fixture(params=FAMILIES)
def tiny(request: pytest.FixtureRequest) -> torch.nn.Module:
    return on_test_device(make_tiny(request.param))


@pytest.fixture
def stories(stories):  # the session's real model, on the test device (a copy when that is not the CPU)
    if TEST_EXACT:
        return stories
    import copy

    return on_test_device(copy.deepcopy(stories))


def random_ids(*args, **kwargs) -> torch.Tensor:
    return on_test_device(conftest.random_ids(*args, **kwargs))


def left_pad(seqs: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(on_test_device(x) for x in conftest.left_pad([s.cpu() for s in seqs], pad_id))


def ids_tensor(rows: list[list[int]]) -> torch.Tensor:
    return on_test_device(torch.tensor(rows))


def decisions_agree(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Two runs' decisions, layer by layer. In float32: the same, exactly. In a 16-bit dtype the same token's score
    is computed from differently rounded numbers (a prefill's matmul vs a decode step's, a batch vs one row), so a
    score near the threshold may fall on the other side (and a flip changes the next layers' inputs): there at
    least 90% of all (token, layer) decisions must agree. Returns whether all do (only then are the logits
    downstream expected to match)."""
    assert len(a) == len(b)
    if TEST_FP32:
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        return True
    same = sum(int((x == y).sum()) for x, y in zip(a, b, strict=True))
    assert same >= 0.9 * sum(x.numel() for x in a)
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def logits(model, ids, mask=None, **kw):
    with torch.no_grad():
        pos = positions(mask) if mask is not None else None
        return model(ids, attention_mask=mask, position_ids=pos, **kw).logits


def thresholds_that_filter(model, ids, level: float = 0.5, **kwargs) -> list[float | None]:
    """Per-layer thresholds at a quantile of the observed scores, so that some tokens are really filtered
    (``kwargs``: the other fields of the filter whose scores they are)."""
    with TokenFilter(threshold=2.0, record_decisions=True, **kwargs).apply(model) as run:
        logits(model, ids)
    taus = []
    for s in run.scores:
        s = s[~s.isnan()].sort().values
        if s.numel() < 2:
            taus.append(None)
            continue
        # the midpoint of the widest gap between neighbouring scores near the quantile: a threshold equal to an
        # observed score would make the decision hang on the last float bit (prefill and decode round differently)
        mid = round(level * (s.numel() - 1))
        lo, hi = max(0, mid - 3), min(s.numel() - 1, mid + 3)
        gaps = s[lo + 1 : hi + 1] - s[lo:hi]
        i = lo + int(gaps.argmax())
        taus.append(float((s[i] + s[i + 1]) / 2))
    return taus


# -- 1. nothing filtered: the unmodified model, bit for bit ------------------------------------------------
@pytest.mark.parametrize(
    "cfg",
    [TokenFilter(ratio=0.0), TokenFilter(ratio=0.5, enabled=False), TokenFilter(threshold=1.5)],
    ids=["ratio0", "disabled", "threshold>1"],
)
def test_nothing_filtered_is_bit_identical(tiny, cfg):
    """torch.equal: with ratio 0 / disabled no layer is patched; with a threshold above 1 the filtered path runs
    but keeps every token, and its attention (SDPA over the same keys) happens to give the same bits on CPU in
    float32 (on another device or dtype its kernels may round differently: there, TEST_TOL)."""
    ids = random_ids(2, 40)
    dense = logits(tiny, ids)
    with torch.no_grad():
        dense_gen = tiny.generate(ids[:, :12], max_new_tokens=8, do_sample=False)
    with cfg.apply(tiny) as run:
        out = logits(tiny, ids)
        with torch.no_grad():
            gen = tiny.generate(ids[:, :12], max_new_tokens=8, do_sample=False)
    if run.filtered_layers and not TEST_EXACT:
        torch.testing.assert_close(out, dense, **TEST_TOL)
    else:
        assert torch.equal(dense, out)
        assert torch.equal(dense_gen, gen)
    assert run.stats.ratio == 0.0


@pytest.mark.parametrize("cfg", [TokenFilter(ratio=0.0), TokenFilter(threshold=1.5)], ids=["ratio0", "threshold>1"])
def test_nothing_filtered_real_weights(stories, cfg):
    ids = ids_tensor([[1] + list(range(20, 120))])
    dense = logits(stories, ids)
    with torch.no_grad():
        dense_gen = stories.generate(ids_tensor([[1]]), max_new_tokens=30, do_sample=False)
    with cfg.apply(stories) as run:
        if run.filtered_layers and not TEST_EXACT:
            torch.testing.assert_close(logits(stories, ids), dense, **TEST_TOL)
            return
        assert torch.equal(dense, logits(stories, ids))
        with torch.no_grad():
            assert torch.equal(dense_gen, stories.generate(ids_tensor([[1]]), max_new_tokens=30, do_sample=False))


@pytest.mark.parametrize("path", BACKENDS)
def test_nothing_filtered_bf16(tiny, path):
    """In bf16, against the unmodified model in bf16: ratio 0 (no layer patched) bit for bit; a threshold above 1
    (the layers patched: scores computed, every token kept) bit for bit on the CPU, as measured (fast and reference,
    prefill and generate), and to bf16 tolerance on another device, whose kernels may round differently."""
    tiny = tiny.to(torch.bfloat16)
    ids = random_ids(2, 40)
    dense = logits(tiny, ids)
    with torch.no_grad():
        dense_gen = tiny.generate(ids[:, :12], max_new_tokens=8, do_sample=False)
    with TokenFilter(ratio=0.0, path=path).apply(tiny) as run:
        assert not run.filtered_layers
        assert torch.equal(logits(tiny, ids), dense)
    for record in (False, True):
        with TokenFilter(threshold=1.5, path=path, record_decisions=record).apply(tiny) as run:
            out = logits(tiny, ids)
            assert_ran_and_kept_everything(run)
            with torch.no_grad():
                gen = tiny.generate(ids[:, :12], max_new_tokens=8, do_sample=False)
            assert_ran_and_kept_everything(run)
        if TEST_DEVICE.type == "cpu":
            assert torch.equal(out, dense)
            assert torch.equal(gen, dense_gen)
        else:
            torch.testing.assert_close(out, dense, atol=2e-2, rtol=2e-2)


# -- 2. threshold mode is causal: prefill == token-by-token decode -------------------------------------------
@pytest.mark.parametrize("kv", ["drop", "keep"])
@pytest.mark.parametrize("skip", ["attention", "block"])
def test_threshold_prefill_equals_decode(tiny, kv, skip):
    ids = random_ids(1, 48)
    taus = thresholds_that_filter(tiny, ids)
    cfg = TokenFilter(threshold=taus, kv=kv, skip=skip, record_decisions=True)
    with cfg.apply(tiny) as run, torch.no_grad():
        prefill = tiny(ids).logits
        prefill_dec = run.decisions
        out = tiny(ids[:, :1], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(1, ids.shape[1]):
            out = tiny(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
        decode_dec = run.decisions
    assert sum(int(d.sum()) for d in prefill_dec) > 0, "the thresholds should filter some tokens"
    agree = decisions_agree(prefill_dec, decode_dec)
    if agree:
        torch.testing.assert_close(torch.cat(steps, dim=1), prefill, **TEST_TOL)


def test_threshold_prefill_equals_decode_real_weights(stories):
    ids = ids_tensor([[1] + list(range(40, 100))])
    taus = thresholds_that_filter(stories, ids)
    with TokenFilter(threshold=taus, record_decisions=True).apply(stories) as run, torch.no_grad():
        prefill = stories(ids).logits
        prefill_dec = run.decisions
        cache, steps = None, []
        for t in range(ids.shape[1]):
            out = stories(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    assert run.stats.ratio > 0
    if decisions_agree(prefill_dec, run.decisions):
        torch.testing.assert_close(torch.cat(steps, dim=1), prefill, **TEST_TOL)


# -- 3. fast path == reference path ------------------------------------------------------------------------
@pytest.mark.parametrize("path", OTHER_BACKENDS)
@pytest.mark.parametrize("kv", ["drop", "keep"])
@pytest.mark.parametrize("skip", ["attention", "block"])
@pytest.mark.parametrize("mode", ["ratio", "threshold"])
def test_fast_equals_reference(tiny, kv, skip, mode, path):
    ids, mask = left_pad([random_ids(1, 70, seed=2)[0], random_ids(1, 52, seed=3)[0]])
    extra = dict(ratio=0.4) if mode == "ratio" else dict(threshold=thresholds_that_filter(tiny, ids))
    results = {}
    for backend in (path, "reference"):
        cfg = TokenFilter(**extra, kv=kv, skip=skip, path=backend, record_decisions=True)
        with cfg.apply(tiny) as run:
            out = logits(tiny, ids, mask)
            with torch.no_grad():
                gen = tiny.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
            results[backend] = (out, run.decisions, gen, run.stats)
    (f_out, f_dec, f_gen, f_stats), (r_out, r_dec, r_gen, r_stats) = results[path], results["reference"]
    real = mask.bool()
    if decisions_agree(f_dec, r_dec):
        torch.testing.assert_close(f_out[real], r_out[real], **TEST_TOL)
        if TEST_FP32:  # 16-bit logits this close can still pick another greedy token
            assert torch.equal(f_gen, r_gen)
            assert f_stats.as_dict() == r_stats.as_dict()
    assert f_stats.ratio > 0


@pytest.mark.parametrize("path", OTHER_BACKENDS)
@pytest.mark.parametrize("skip", ["attention", "none"])
def test_fast_equals_reference_bf16(tiny, skip, path):
    """bf16: same decisions and close logits. On the KV side every token's attention runs through the fast
    path's merge of two attention calls, whose bf16 rounding differs from the masked reference's: a score
    at a layer's top-k boundary may then swap places with its neighbour (at most 1% of the decisions)."""
    tiny = tiny.to(torch.bfloat16)
    ids = random_ids(2, 64)
    outs, decs = [], []
    for backend in (path, "reference"):
        with TokenFilter(ratio=0.4, skip=skip, path=backend, record_decisions=True).apply(tiny) as run:
            outs.append(logits(tiny, ids).float())
            decs.append(run.decisions)
    differ = sum(int((a != b).sum()) for a, b in zip(*decs, strict=True))
    assert differ == 0 if skip == "attention" else differ <= 0.01 * sum(d.numel() for d in decs[0])
    for a, b in zip(*decs, strict=True):  # a swap keeps every row's count
        assert torch.equal(a.sum(-1), b.sum(-1))
    torch.testing.assert_close(outs[0], outs[1], atol=3e-2, rtol=3e-2)


# -- 4. left padding: each sequence as if alone ----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["ratio", "threshold"])
@pytest.mark.parametrize("path", BACKENDS)
def test_left_padded_batch_equals_alone(tiny, mode, path):
    seqs = [random_ids(1, n, seed=s)[0] for n, s in ((72, 4), (64, 5), (90, 6))]
    ids, mask = left_pad(seqs)
    extra = dict(ratio=0.5) if mode == "ratio" else dict(threshold=thresholds_that_filter(tiny, ids[:1]))
    cfg = TokenFilter(**extra, path=path, record_decisions=True)
    with cfg.apply(tiny) as run:
        batch = logits(tiny, ids, mask)
        batch_dec = run.decisions
        with torch.no_grad():
            batch_gen = tiny.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        for i, s in enumerate(seqs):
            alone = logits(tiny, s[None])
            n = len(s)
            assert not any(layer_dec[i, :-n].any() for layer_dec in batch_dec), "padding is never 'filtered'"
            if decisions_agree([d[i, -n:] for d in batch_dec], [d[0] for d in run.decisions]):
                torch.testing.assert_close(batch[i, -n:], alone[0], **TEST_TOL)
            with torch.no_grad():
                gen = tiny.generate(s[None], max_new_tokens=8, do_sample=False)
            if TEST_FP32:
                assert torch.equal(batch_gen[i, -8:], gen[0, -8:])


def test_sampling_generate_runs_and_is_seeded(tiny):
    ids = random_ids(2, 30)
    outs = []
    with TokenFilter(ratio=0.3).apply(tiny) as run:
        for _ in range(2):
            torch.manual_seed(7)
            with torch.no_grad():
                outs.append(tiny.generate(ids, max_new_tokens=10, do_sample=True, top_k=20))
    assert torch.equal(outs[0], outs[1])
    assert outs[0].shape == (2, 40)
    assert 0 < run.stats.ratio < 0.5


def test_eager_attention_model(tiny):
    """The filtered path does not depend on the model's attention implementation."""
    eager = on_test_device(make_tiny(tiny.config.model_type, attn="eager"))
    ids = random_ids(1, 50)
    outs = []
    for m in (tiny, eager):
        with TokenFilter(ratio=0.4).apply(m):
            outs.append(logits(m, ids))
    torch.testing.assert_close(outs[0], outs[1], **(dict(atol=1e-4, rtol=1e-4) if TEST_FP32 else TEST_TOL))


def test_beam_search_reorders_the_filtered_cache(tiny):
    """Beam search reorders the cache every step: nothing filtered (threshold > 1, layers patched) equals dense,
    and with real filtering the ragged cache (fast path) and the masked one (reference path) pick the same beams."""
    ids = random_ids(2, 20)
    kwargs = dict(max_new_tokens=8, num_beams=3, do_sample=False, num_return_sequences=2)
    with torch.no_grad():
        dense = tiny.generate(ids, **kwargs)
        with TokenFilter(threshold=1.5).apply(tiny) as run:
            assert run.filtered_layers
            if TEST_EXACT:
                assert torch.equal(tiny.generate(ids, **kwargs), dense)
        outs = []
        for path in BACKENDS:
            with TokenFilter(threshold=0.2, warmup=2, path=path).apply(tiny) as run:
                outs.append(tiny.generate(ids, **kwargs))
            assert run.stats.ratio > 0
    if TEST_FP32:
        assert all(torch.equal(out, outs[0]) for out in outs[1:])
