"""The log-sum-exp attention the KV side merges (``attend_lse``): its kernels give the same numbers.

On the CPU the engine runs ATen's CPU flash kernel; on CUDA the memory-efficient kernel, with the plain formula
(``math``) as its fallback. ``math`` runs on every machine, so it is checked here against the CPU kernel, directly
and through the engine (the KV-side fast path with every lse attention forced to ``math`` equals the reference
path); the CUDA kernel is checked where a GPU is present.
"""

from __future__ import annotations

import pytest
import torch

from tokenfilter import TokenFilter
from tokenfilter.integration.backends import fast as fast_backend
from tokenfilter.integration.backends import kernels
from tokenfilter.integration.backends.kernels import attend_lse, lse_impl, merge_lse

from conftest import left_pad, make_tiny, random_ids


def _inputs(b=2, hq=4, h=2, n=7, k=11, d=16, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, keys, values = (torch.randn(b, x, y, d, generator=g) for x, y in ((hq, n), (h, k), (h, k)))
    allowed = torch.rand(b, n, k, generator=g) < 0.6
    allowed[0, 0] = False  # a query that reads nothing
    allowed[1, 2, :] = False
    allowed[1, 3, :] = True
    return [x.to(device=device, dtype=dtype) for x in (q, keys, values)] + [allowed.to(device)]


def _reference(q, keys, values, allowed, scale):
    g = q.shape[1] // keys.shape[1]
    k, v = keys.repeat_interleave(g, 1).double(), values.repeat_interleave(g, 1).double()
    s = (q.double() @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    lse = s.logsumexp(-1)
    p = torch.where(allowed[:, None], torch.exp(s - lse[..., None]), 0.0)
    return p @ v, lse


@pytest.mark.parametrize("b", [1, 2])  # one row: the CPU kernel's batch-of-heads layout; two: heads stacked
@pytest.mark.parametrize("impl", ["cpu-flash", "math"])
def test_lse_kernels_agree_with_the_formula_in_float64(impl, b):
    q, keys, values, allowed = (x[:b] for x in _inputs())
    out, lse = attend_lse(q, keys, values, allowed, 0.25, impl=impl)
    want_out, want_lse = _reference(q, keys, values, allowed, 0.25)
    none = ~allowed.any(-1)[:, None].expand_as(lse)
    assert out.dtype == lse.dtype == torch.float32
    assert torch.isneginf(lse[none]).all() and (out[none] == 0).all()
    torch.testing.assert_close(lse[~none].double(), want_lse[~none], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[~none].double(), want_out[~none], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["cpu-flash", "math"])
def test_merging_two_parts_is_attention_over_their_union(impl):
    """Queries with keys in one part only, in both, and in neither (output 0) included."""
    q, keys, values, allowed = _inputs(k=12, seed=3)
    part = torch.zeros_like(allowed)
    part[..., :5] = True
    allowed[0, 1, :5] = False  # keys in the second part only
    allowed[0, 2, 5:] = False  # keys in the first part only
    parts = [attend_lse(q, keys, values, allowed & m, 0.3, impl=impl) for m in (part, ~part)]
    merged = merge_lse(parts[0][0], parts[0][1], parts[1][0], parts[1][1])
    whole, _ = attend_lse(q, keys, values, allowed, 0.3, impl="math")
    assert (merged[0, :, 0] == 0).all() and (merged[1, :, 2] == 0).all()
    torch.testing.assert_close(merged, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [True, False])
def test_cpu_kernel_gives_one_row_what_it_gives_that_row_in_a_batch(dtype, masked):
    """One row runs the CPU kernel with the query heads of a key head as a batch over the same keys (a stride-0
    view); a batch stacks them along the queries: the same numbers for the same row."""
    q, keys, values, allowed = _inputs(hq=6, h=2, n=70, k=90, d=32, seed=4, dtype=dtype)
    mask = allowed if masked else None
    out, lse = attend_lse(q, keys, values, mask, 0.2, impl="cpu-flash")
    for row in range(2):
        one = attend_lse(q[row:row + 1], keys[row:row + 1], values[row:row + 1],
                         None if mask is None else mask[row:row + 1], 0.2, impl="cpu-flash")
        torch.testing.assert_close(one[0], out[row:row + 1], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(one[1], lse[row:row + 1], atol=1e-6, rtol=1e-6)
    want_out, want_lse = attend_lse(q, keys, values, mask, 0.2, impl="math")
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out, want_out, **tol)
    torch.testing.assert_close(lse, want_lse, **tol)


def test_unknown_lse_kernel_is_an_error():
    q, keys, values, allowed = _inputs()
    with pytest.raises(ValueError, match="impl must be one of"):
        attend_lse(q, keys, values, allowed, 0.25, impl="flex")
    assert lse_impl(torch.device("cpu")) == "cpu-flash" and lse_impl(torch.device("cuda")) == "cuda-efficient"
    assert lse_impl(torch.device("meta")) == "math"


@pytest.mark.parametrize("recent", [3, 8])
def test_kv_side_fast_path_with_the_math_kernel_equals_reference(monkeypatch, recent):
    """The GPU's fallback formula, through the engine on the CPU: prefill (band + staircase) and the lean decode
    step, left padding included."""
    model = make_tiny("llama")
    ids, mask = left_pad([random_ids(1, 40, seed=2)[0], random_ids(1, 33, seed=3)[0]])
    seen = []
    original = kernels.attend_lse

    def forced(*args, impl=None, **kwargs):
        seen.append(impl)
        return original(*args, impl="math", **kwargs)

    outs = {}
    for path in ("fast", "reference"):
        if path == "fast":
            for module in (kernels, fast_backend):  # the staircase and band kernels, and the lean decode step
                monkeypatch.setattr(module, "attend_lse", forced)
        cfg = TokenFilter(ratio=0.5, skip="none", recent=recent, path=path, record_decisions=True)
        with cfg.apply(model) as run, torch.no_grad():
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                 output_scores=True, return_dict_in_generate=True)
        outs[path] = (gen.sequences, torch.stack(gen.scores), run.decisions)
        monkeypatch.undo()
    assert seen, "the fast path ran lse attentions"
    assert torch.equal(outs["fast"][0], outs["reference"][0])
    torch.testing.assert_close(outs["fast"][1], outs["reference"][1], atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(outs["fast"][2], outs["reference"][2], strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernel needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_efficient_kernel_equals_math(dtype):
    q, keys, values, allowed = _inputs(n=33, k=70, d=64, dtype=dtype, device="cuda")
    out, lse = attend_lse(q, keys, values, allowed, 0.125, impl="cuda-efficient")
    want_out, want_lse = attend_lse(q, keys, values, allowed, 0.125, impl="math")
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, want_out, **tol)
    torch.testing.assert_close(lse, want_lse, **tol)


@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("block", [16, 256])
def test_range_attention_equals_masked_attention(window, block):
    """``attend_lse_ranges`` (an unmasked call over the keys a whole block reads, a masked one over the rest) gives
    what one masked ``attend_lse`` over every key gives, for ragged rows, padding queries, a model window and
    queries that read no stored key at all."""
    from tokenfilter.integration.backends.kernels import attend_lse_ranges, key_ranges

    g = torch.Generator().manual_seed(block)
    b, hq, h, n, d = 2, 6, 2, 90, 16
    q = torch.randn(b, hq, n, d, generator=g)
    keys, values = torch.randn(b, h, 70, d, generator=g), torch.randn(b, h, 70, d, generator=g)
    # stored keys: sorted positions, row 1 holds fewer (its tail slots are invalid and hold stale positions)
    k_pos = torch.stack([torch.randperm(120, generator=g)[:70].sort().values for _ in range(b)])
    k_valid = torch.ones(b, 70, dtype=torch.bool)
    k_valid[1, 50:] = False
    q_pos = torch.stack([torch.arange(30, 120)] * b)
    q_valid = torch.ones(b, n, dtype=torch.bool)
    q_valid[1, 80:] = False  # padding queries
    lo, hi = key_ranges(q_pos, q_valid, k_pos, k_valid, window)
    allowed = k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])
    if window is not None:
        allowed &= k_pos[:, None, :] > q_pos[:, :, None] - window
    allowed &= q_valid[:, :, None]
    slots = torch.arange(70)
    assert torch.equal((slots >= lo[..., None]) & (slots < hi[..., None]), allowed)
    want_out, want_lse = attend_lse(q, keys, values, allowed, 0.3, impl="math")
    out, lse = attend_lse_ranges(q, keys, values, lo, hi, q_valid, 0.3, block=block)
    real = q_valid[:, None, :]
    torch.testing.assert_close(out * real[..., None], want_out * real[..., None], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.masked_fill(~real, 0), want_lse.masked_fill(~real, 0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["cpu-flash", "math"])
def test_no_mask_means_every_key(impl):
    """``allowed=None`` (the unmasked part of a block) is the all-True mask, without building it."""
    g = torch.Generator().manual_seed(5)
    q, keys = torch.randn(2, 6, 9, 16, generator=g), torch.randn(2, 2, 13, 16, generator=g)
    values = torch.randn(2, 2, 13, 16, generator=g)
    want = attend_lse(q, keys, values, torch.ones(2, 9, 13, dtype=torch.bool), 0.3, impl=impl)
    got = attend_lse(q, keys, values, None, 0.3, impl=impl)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
