"""The attention kernels the backends share: masked attention over stored entries, attention that also returns
each query's log-sum-exp (to merge disjoint key sets), the staircase and recent-band layouts of the KV side, and
the compaction of a ragged selection of tokens (flash-attention's varlen idea in a padded tensor).

Shapes: B batch (rows), Hq/H query/key-value heads, Q queries, K keys, d head dim.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from tokenfilter.algorithm.visibility import Visibility


def compact_order(mask: torch.Tensor, aligned: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Indices that bring each row's True entries to the front, in order.

    ``mask``: ``[B, T]`` -> ``(order [B, N], valid [B, N], N)`` with N the largest row count. ``aligned`` promises
    that each row's True entries already lead it (right padding): the order is then the identity, with no sort.
    """
    counts = mask.sum(-1)
    n = int(counts.max()) if mask.numel() else 0
    arange = torch.arange(n, device=mask.device)[None, :]
    if aligned:
        order = arange.expand(mask.shape[0], n)
    else:
        order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[:, :n]
    return order, arange < counts[:, None], n


def gather_rows(x: torch.Tensor, order: torch.Tensor, aligned: bool = False) -> torch.Tensor:
    """``x``: ``[B, T, ...]``, ``order``: ``[B, N]`` -> ``[B, N, ...]``; ``aligned`` (``order`` is the identity,
    ``compact_order``'s promise): the first N columns, a view."""
    if aligned:
        return x[:, : order.shape[1]]
    idx = order.view(*order.shape, *([1] * (x.dim() - 2))).expand(*order.shape, *x.shape[2:])
    return x.gather(1, idx)


def scatter_rows(x: torch.Tensor, order: torch.Tensor, valid: torch.Tensor, t: int) -> torch.Tensor:
    """The inverse of ``gather_rows``: ``x`` ``[B, N, D]`` back to columns ``order`` ``[B, N]`` of a ``[B, t, D]``
    zero tensor; the gather's padding entries (``valid`` False) write 0."""
    b, _, dim = x.shape
    out = x.new_zeros(b, t, dim)
    out.scatter_(1, order[..., None].expand(-1, -1, dim), x * valid[..., None].to(x.dtype))
    return out


def attend(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    q_valid: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    k_pos: torch.Tensor,
    k_valid: torch.Tensor,
    scale: float,
    vis: Visibility,
    causal: bool = False,
    counted: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over stored entries, causal by original column positions (and the model's own window).

    ``q``: ``[B, Hq, Q, d]``; ``q_pos, q_valid``: ``[B, Q]``; ``keys, values``: ``[B, H, K, d]``;
    ``k_pos, k_valid``: ``[B, K]``. Returns ``(out [B, Hq, Q, d], pairs)`` where ``pairs`` counts the
    (query, key) pairs attended by the ``counted`` queries ``[B, Q]`` (default: the valid ones).

    ``causal=True`` promises that row b's keys are its valid queries, in the same order, left-aligned
    (``K == Q``) and all within the window: then the mask is plain causal and is not built.
    """
    if causal:
        counts = q_valid.sum(-1)
        pairs = (counts * (counts + 1) // 2).sum()
        out = F.scaled_dot_product_attention(
            q, keys, values, is_causal=True, scale=scale, enable_gqa=q.shape[1] != keys.shape[1]
        )
        return out, pairs
    allowed = k_valid[:, None, :] & vis.in_window(q_pos[:, :, None], k_pos[:, None, :])
    pairs = (allowed & (q_valid if counted is None else counted)[:, :, None]).sum()
    return attend_masked(q, keys, values, allowed, scale), pairs


def attend_masked(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor, scale: float
) -> torch.Tensor:
    """SDPA of ``q`` ``[B, Hq, Q, d]`` over ``keys, values`` ``[B, H, K, d]`` where ``allowed`` ``[B, Q, K]`` (the
    same for every head). A query that may read no key (padding) reads them all instead: any finite output, which
    the caller discards."""
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return F.scaled_dot_product_attention(
        q, keys, values, attn_mask=allowed[:, None], scale=scale, enable_gqa=q.shape[1] != keys.shape[1]
    )


LSE_IMPLS = ("cpu-flash", "cuda-efficient", "math")
# queries per block of ``attend_band`` when the band is longer: each query then multiplies R + 31 sources, where
# blocks of R (the default window, 64) would multiply 2R - 1; measured the faster on a CPU at 512 and 2048 tokens
_BAND_BLOCK = 32


def lse_impl(device: torch.device) -> str:
    """The ``attend_lse`` kernel for ``device``: ATen's CPU flash kernel on the CPU, the memory-efficient kernel
    (arbitrary bias, returns the lse) on CUDA, the plain formula elsewhere."""
    return {"cpu": "cpu-flash", "cuda": "cuda-efficient"}.get(device.type, "math")


_FELL_BACK: set[str] = set()


def attend_lse(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    allowed: torch.Tensor | None,
    scale: float,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention that also returns each query's log-sum-exp (to merge with another part).

    ``q``: ``[B, Hq, Q, d]``; ``keys, values``: ``[B, H, K, d]`` (query head i reads key head ``i // (Hq/H)``);
    ``allowed``: ``[B, Q, K]``, or None when every query reads every key (no mask at all). Returns
    ``(out [B, Hq, Q, d] float32, lse [B, Hq, Q] float32)``; a query with no allowed key has output 0 and lse
    ``-inf``.

    ``impl`` (default: ``lse_impl(q.device)``): ``cpu-flash``, the flash kernel public SDPA runs on the CPU, which
    returns the lse; ``cuda-efficient``, the memory-efficient CUDA kernel (``compute_log_sumexp``), falling back to
    ``math`` (with a warning, once) where it refuses the inputs; ``math``, the formula in float32 (what SDPA's math
    backend computes). All three give the same numbers to float tolerance; the tests run ``math`` against
    ``cpu-flash`` on the CPU, so the formula the GPU falls back to is checked on every machine.
    """
    impl = impl or lse_impl(q.device)
    if impl not in LSE_IMPLS:
        raise ValueError(f"impl must be one of {', '.join(LSE_IMPLS)}, got {impl!r}.")
    b, hq, n_q, d = q.shape
    none = None if allowed is None else ~allowed.any(-1)  # [B, Q] queries with no key
    out = lse = None
    if impl == "cpu-flash":  # the kernel gives a query with no key output 0 (its lse is set below)
        out, lse = _cpu_flash_lse(q, keys, values, allowed, scale)
    else:
        h, g = keys.shape[1], hq // keys.shape[1]
        qg = q.reshape(b, h, g * n_q, d)  # the g query heads of one key head, stacked along the queries
        if allowed is None:  # every query reads every key: the all-True mask as a view
            allowed = torch.ones((), dtype=torch.bool, device=q.device).expand(b, n_q, keys.shape[2])
        mask = allowed[:, None, None].expand(b, 1, g, n_q, allowed.shape[-1])
        if impl == "cuda-efficient":
            try:
                out, lse = _efficient_lse(qg, keys, values, mask.reshape(b, 1, g * n_q, -1), scale)
            except RuntimeError as exc:  # a dtype, head size or alignment the kernel does not take
                if "cuda-efficient" not in _FELL_BACK:
                    _FELL_BACK.add("cuda-efficient")
                    warnings.warn(f"tokenfilter: the CUDA memory-efficient kernel refused an lse attention ({exc}); "
                                  "using the plain formula", stacklevel=2)
        if out is None:
            out, lse = _math_lse(qg, keys, values, mask, scale)
        if none is not None:
            out = out.reshape(b, hq, n_q, d).masked_fill(none[:, None, :, None], 0.0)
    out, lse = out.float().reshape(b, hq, n_q, d), lse.float().reshape(b, hq, n_q)
    if none is not None:
        lse = lse.masked_fill(none[:, None, :], float("-inf"))
    return out, lse


def _cpu_flash_lse(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attend_lse`` through ATen's CPU flash kernel: ``(out [B, Hq, Q, d], lse [B, Hq, Q])`` in the query's
    dtype; a query with no allowed key gets output 0 and an undefined lse. The mask becomes an additive bias
    ``[B, 1, Q, K]`` (one pass; the kernel takes no bool mask). With one row (B == 1) the g query heads of a key
    head go as a batch of g over the same keys (a stride-0 view): the queries are not copied and the bias is not
    repeated; otherwise they are stacked along the queries and the bias repeated g times."""
    b, hq, n_q, d = q.shape
    h, k_len = keys.shape[1], keys.shape[2]
    g = hq // h
    bias = None
    if allowed is not None:
        zero, never = q.new_zeros(()), q.new_full((), float("-inf"))
        bias = torch.where(allowed, zero, never)[:, None]  # [B, 1, Q, K]
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if b == 1:
        qb = q.view(h, g, n_q, d).transpose(0, 1)  # [g, H, Q, d]: batch gi holds query head h * g + gi
        out, lse = flash(qb, keys.expand(g, h, k_len, d), values.expand(g, h, k_len, d), attn_mask=bias,
                         scale=scale)[:2]
        return out.transpose(0, 1).reshape(1, hq, n_q, d), lse.transpose(0, 1).reshape(1, hq, n_q)
    if bias is not None:
        bias = bias[:, :, None].expand(b, 1, g, n_q, k_len).reshape(b, 1, g * n_q, k_len).expand(b, h, -1, -1)
    out, lse = flash(q.reshape(b, h, g * n_q, d), keys, values, attn_mask=bias, scale=scale)[:2]
    return out.reshape(b, hq, n_q, d), lse.reshape(b, hq, n_q)


def _math_lse(
    qg: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The formula in float32 (what SDPA's math backend computes): ``[B, H, G*Q, d]`` queries, ``mask`` any shape
    that reshapes to ``[B, 1, G*Q, K]``."""
    mask = mask.reshape(qg.shape[0], 1, qg.shape[2], -1)
    s = torch.matmul(qg.float(), keys.float().transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = s.logsumexp(-1)
    p = torch.where(mask, torch.exp(s - lse[..., None]), 0.0)
    return torch.matmul(p, values.float()), lse


def _efficient_lse(
    qg: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, H, G*Q, d]`` queries over ``[B, H, K, d]`` keys with a bool ``mask`` ``[B, 1, G*Q, K]`` through
    ``aten._scaled_dot_product_efficient_attention`` (CUDA): the bias is padded to a multiple of 16 keys (the
    kernel's alignment) and sliced back; its lse comes padded along the queries and is cut to G*Q."""
    b, h, n, _ = qg.shape
    k = keys.shape[2]
    width = -(-k // 16) * 16
    bias = torch.full((b, 1, n, width), float("-inf"), dtype=qg.dtype, device=qg.device)
    bias[..., :k].masked_fill_(mask, 0.0)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        qg, keys, values, bias[..., :k].expand(b, h, n, k), True, scale=scale
    )[:2]
    return out, lse[..., :n]


def key_ranges(
    q_pos: torch.Tensor, q_valid: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor, window: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's readable stored keys as a range ``[lo, hi)`` of key slots: keys sorted by position in each row's
    valid prefix (``RaggedKV``), read causally and within the model's ``window``. ``q_pos, q_valid``: ``[B, Q]``;
    ``k_pos, k_valid``: ``[B, K]`` -> ``(lo, hi)`` ``[B, Q]`` long, ``lo <= hi`` (an empty range for an invalid
    query)."""
    pos = k_pos.masked_fill(~k_valid, torch.iinfo(k_pos.dtype).max).contiguous()  # sorted, invalid slots last
    q = q_pos.contiguous()
    hi = torch.searchsorted(pos, q, right=True)  # keys at or before the query
    lo = torch.zeros_like(hi) if window is None else torch.searchsorted(pos, q - window, right=True)
    lo, hi = lo.masked_fill(~q_valid, 0), hi.masked_fill(~q_valid, 0)
    return lo, torch.maximum(lo, hi)


def attend_lse_ranges(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
    q_valid: torch.Tensor, scale: float, block: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attend_lse`` where query i reads the key slots ``[lo[i], hi[i])`` (``key_ranges``), with no mask over all
    keys: queries go in blocks of ``block``; the keys every query of a block reads (those before the block, when
    the ranges all start at the same slot) go through one unmasked call, with no bias to build or read, and only
    the rest is masked; the two are merged by log-sum-exp. Keys past a block's reach are never multiplied.
    In half precision every part's output is rounded to the half type before the merge, so the split would add a
    rounding: there each block is one masked call. ``lo, hi, q_valid``: ``[B, Q]`` (an invalid query's output is
    left undefined); the rest as ``attend_lse``."""
    b, hq, n, d = q.shape
    nb, big = -(-n // block), keys.shape[2]
    pad = nb * block - n

    def per_block(x: torch.Tensor, fill: int, reduce: str) -> torch.Tensor:  # [B, Q] -> [blocks], valid queries
        x = F.pad(x.masked_fill(~q_valid, fill), (0, pad), value=fill).view(b, nb, block)
        return x.amin((0, 2)) if reduce == "min" else x.amax((0, 2))

    stats = torch.stack([per_block(lo, big, "min"), per_block(lo, 0, "max"), per_block(hi, big, "min"),
                         per_block(hi, 0, "max")], dim=1).tolist()  # one host sync for every block
    outs, lses = [], []
    for c, (lo_min, lo_max, hi_min, hi_max) in enumerate(stats):
        rows = slice(c * block, (c + 1) * block)
        qb = q[:, :, rows]
        lo_min = min(lo_min, hi_max)
        # a second call pays for itself when it spares a mask over at least a block's worth of keys
        split = lo_min == lo_max and hi_min - lo_max >= block and q.dtype == torch.float32
        common = hi_min if split else lo_min  # [lo_min, common): read by every query of the block
        parts = []
        if hi_max > common:
            slots = torch.arange(common, hi_max, device=q.device)
            mask = (slots >= lo[:, rows, None]) & (slots < hi[:, rows, None])
            parts.append(attend_lse(qb, keys[:, :, common:hi_max], values[:, :, common:hi_max], mask, scale))
        if common > lo_min:
            parts.append(attend_lse(qb, keys[:, :, lo_min:common], values[:, :, lo_min:common], None, scale))
        if not parts:
            o = torch.zeros(b, hq, qb.shape[2], d, device=q.device)
            lse = torch.full((b, hq, qb.shape[2]), float("-inf"), device=q.device)
        elif len(parts) == 1:
            o, lse = parts[0]
        else:
            (o_a, lse_a), (o_b, lse_b) = parts
            o, lse = merge_lse(o_a, lse_a, o_b, lse_b), torch.logaddexp(lse_a, lse_b)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def attend_band(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    q_idx: torch.Tensor,
    q_valid: torch.Tensor,
    band: tuple[torch.Tensor, ...],
    scale: float,
    vis: Visibility,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of each query over the non-stored keys of its recent band only.

    ``q``: ``[B, Hq, N, d]``, ``q_pos, q_idx, q_valid``: ``[B, N]``, the call's real tokens left-aligned;
    ``band``: ``RecentRing.extend``'s sources, ``(keys [B, H, M + N, d], values, cols [B, M + N], idx, live)``
    with ``M = vis.recent - 1``: query i reads sources ``i .. i + M``. Returns ``(out [B, Hq, N, d] float32,
    lse [B, Hq, N] float32, pairs)``.

    The queries go in blocks of ``m = min(R, _BAND_BLOCK)`` (R = ``vis.recent``): block c reads the ``m + R - 1``
    sources that its queries' bands cover, one batched masked attention for all blocks (at most ``R + m`` products
    per query, never N; a long band is not read in blocks of R, which would cost 2R per query).
    """
    keys, values, cols, idx, live = band
    r = vis.recent
    b, hq, n, d = q.shape
    h = keys.shape[1]
    if r == 1:  # each query reads its own key only (if it is not stored): no softmax to speak of
        ok = live[:, :n] & q_valid & vis.in_window(q_pos, cols[:, :n])
        g = hq // h
        own_k, own_v = keys[:, :, :n].repeat_interleave(g, 1), values[:, :, :n].repeat_interleave(g, 1)
        lse = (q.float() * own_k.float()).sum(-1) * scale  # [B, Hq, N]
        lse = lse.masked_fill(~ok[:, None], float("-inf"))
        return own_v.float() * ok[:, None, :, None], lse, ok.sum()
    m = min(r, _BAND_BLOCK)
    blocks, win = -(-n // m), m + r - 1
    extra = blocks * m + r - 1 - keys.shape[2]  # pad the sources so that the last block has its window
    pad = (0, extra)
    keys, values = F.pad(keys, (0, 0, *pad)), F.pad(values, (0, 0, *pad))
    cols, idx, live = F.pad(cols, pad), F.pad(idx, pad), F.pad(live, pad)
    qp = blocks * m - n
    q = F.pad(q, (0, 0, 0, qp))
    q_pos, q_idx, q_valid = F.pad(q_pos, (0, qp)), F.pad(q_idx, (0, qp)), F.pad(q_valid, (0, qp))

    def windows(x: torch.Tensor, dim: int) -> torch.Tensor:  # [.., S, ..] -> [.., blocks, .., win] (a view)
        return x.unfold(dim, win, m)

    kb = windows(keys, 2).permute(0, 2, 1, 4, 3).reshape(b * blocks, h, win, d)
    vb = windows(values, 2).permute(0, 2, 1, 4, 3).reshape(b * blocks, h, win, d)
    qb = q.reshape(b, hq, blocks, m, d).transpose(1, 2).reshape(b * blocks, hq, m, d)
    ok = windows(live, 1)[:, :, None, :] & q_valid.view(b, blocks, m, 1)  # [B, blocks, m, win]
    ok &= vis.in_window(q_pos.view(b, blocks, m, 1), windows(cols, 1)[:, :, None, :])
    ok &= vis.in_band(q_idx.view(b, blocks, m, 1), windows(idx, 1)[:, :, None, :])
    out, lse = attend_lse(qb, kb, vb, ok.reshape(b * blocks, m, win), scale)
    out = out.view(b, blocks, hq, m, d).transpose(1, 2).reshape(b, hq, blocks * m, d)[:, :, :n]
    lse = lse.view(b, blocks, hq, m).transpose(1, 2).reshape(b, hq, blocks * m)[:, :, :n]
    return out, lse, ok.sum()


def merge_lse(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Softmax attention over the union of two disjoint key sets, from each part's output ``[B, Hq, N, d]``
    and log-sum-exp ``[B, Hq, N]``. A query with no key in either part gets 0 (each part's output for it is 0).

    Part b's share of the softmax mass is ``sigmoid(lse_b - lse_a)``, so the merge is one interpolation over the
    outputs (a part with no key has share 0; a query with none in either, ``-inf - -inf``, keeps part a's 0)."""
    share = torch.sigmoid(lse_b - lse_a).nan_to_num_(0.0)
    return torch.lerp(out_a, out_b, share[..., None])
