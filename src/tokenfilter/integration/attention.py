"""The attention path of a filtered layer, installed in place of ``self_attn.forward``.

Shapes: B batch, T tokens in this call, D hidden size, H/Hq key-value/query heads, d head dim.

Per call, for one layer:
1. K and V projections for every token (the decision needs them), the family's k-norm if any.
2. Scores against the running anchors (pre- or post-RoPE keys), then decisions (True = filtered).
3. The layer's ``Visibility`` (who may read whom: ``algorithm/visibility.py``) says which tokens read and which
   are stored: keys (with RoPE) and values of the stored tokens go into the layer's ``FilteredCacheLayer``; on
   the KV side its ring slides over the call's real tokens (the recent band's entries).
4. Fast path: only the reading tokens are gathered and run through the Q projection, attention over the
   stored entries (plus, where the band has entries no one stored, attention over each query's band merged
   by log-sum-exp) and the output projection, then scattered back; a token that does not read gets a zero
   output so the residual passes. Reference path: everything is computed over every column and masked by
   ``Visibility.allowed`` instead (same decisions, used to check the fast one).

With per-KV-head decisions (``granularity="head"``, reference path) steps 1-3 and the masks run on rows that are
(sequence, KV head) pairs holding one head each (``integration/units.py``); only the queries and the output are
reshaped around the attention.

The fast path has two shortcuts that compute the same thing with less work:
* a prefill into an empty store whose stored tokens are exactly the queries (query side with ``kv="drop"``,
  or nothing filtered) is plain causal attention over the compacted rows: SDPA with ``is_causal=True``;
* a query-side decode step (one token per row, every row real and past warm-up) runs a lean path: no compaction,
  gathers or scatters, no mask when every row stores the same number of entries, host syncs only for the
  number of kept rows, and the statistics counted in Python.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from tokenfilter.algorithm.decisions import above, top_ratio
from tokenfilter.algorithm.scores import SCORES, ScoreState
from tokenfilter.algorithm.visibility import Visibility
from tokenfilter.integration.cache_args import cache_argument
from tokenfilter.integration.cache_layer import FilteredCacheLayer
from tokenfilter.integration.families import sliding_window
from tokenfilter.integration.fused import fused_score
from tokenfilter.integration.kv_store import RaggedKV
from tokenfilter.integration.units import Units

if TYPE_CHECKING:
    from tokenfilter.integration.run import FilterRun


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as the supported families apply it. ``x``: ``[B, T, H, d]``; ``cos, sin``: ``[B, T, d]``."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return (x * cos) + (rotate_half(x) * sin)


def compact_order(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Indices that bring each row's True entries to the front, in order.

    ``mask``: ``[B, T]`` -> ``(order [B, N], valid [B, N], N)`` with N the largest row count.
    """
    counts = mask.sum(-1)
    n = int(counts.max()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[:, :n]
    valid = torch.arange(n, device=mask.device)[None, :] < counts[:, None]
    return order, valid, n


def gather_rows(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x``: ``[B, T, ...]``, ``order``: ``[B, N]`` -> ``[B, N, ...]``."""
    idx = order.view(*order.shape, *([1] * (x.dim() - 2))).expand(*order.shape, *x.shape[2:])
    return x.gather(1, idx)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over stored entries, causal by original column positions (and the model's own window).

    ``q``: ``[B, Hq, Q, d]``; ``q_pos, q_valid``: ``[B, Q]``; ``keys, values``: ``[B, H, K, d]``;
    ``k_pos, k_valid``: ``[B, K]``. Returns ``(out [B, Hq, Q, d], pairs)`` where ``pairs`` counts the
    (valid query, key) pairs attended.

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
    pairs = (allowed & q_valid[:, :, None]).sum()
    allowed = allowed | ~allowed.any(-1, keepdim=True)  # rows of padding queries: any finite output
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=allowed[:, None], scale=scale, enable_gqa=q.shape[1] != keys.shape[1]
    )
    return out, pairs


LSE_IMPLS = ("cpu-flash", "cuda-efficient", "math")


def lse_impl(device: torch.device) -> str:
    """The ``attend_lse`` kernel for ``device``: ATen's CPU flash kernel on the CPU, the memory-efficient kernel
    (arbitrary bias, returns the lse) on CUDA, the plain formula elsewhere."""
    return {"cpu": "cpu-flash", "cuda": "cuda-efficient"}.get(device.type, "math")


_FELL_BACK: set[str] = set()


def attend_lse(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention that also returns each query's log-sum-exp (to merge with another part).

    ``q``: ``[B, Hq, Q, d]``; ``keys, values``: ``[B, H, K, d]`` (query head i reads key head ``i // (Hq/H)``);
    ``allowed``: ``[B, Q, K]``. Returns ``(out [B, Hq, Q, d] float32, lse [B, Hq, Q] float32)``; a query with no
    allowed key has output 0 and lse ``-inf``.

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
    h = keys.shape[1]
    g = hq // h
    qg = q.reshape(b, h, g * n_q, d)  # the g query heads of one key head, stacked along the queries
    mask = allowed[:, None, None].expand(b, 1, g, n_q, allowed.shape[-1]).reshape(b, 1, g * n_q, -1)
    none = ~allowed.any(-1)  # [B, Q]
    out = lse = None
    if impl == "cpu-flash":
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qg, keys, values, attn_mask=bias.expand(b, h, -1, -1), scale=scale
        )[:2]
    elif impl == "cuda-efficient":
        try:
            out, lse = _efficient_lse(qg, keys, values, mask, scale)
        except RuntimeError as exc:  # a dtype, head size or alignment the kernel does not take
            if "cuda-efficient" not in _FELL_BACK:
                _FELL_BACK.add("cuda-efficient")
                import warnings

                warnings.warn(f"tokenfilter: the CUDA memory-efficient kernel refused an lse attention ({exc}); "
                              "using the plain formula", stacklevel=2)
    if out is None:
        s = torch.matmul(qg.float(), keys.float().transpose(-1, -2)) * scale
        s = s.masked_fill(~mask, float("-inf"))
        lse = s.logsumexp(-1)
        p = torch.where(mask, torch.exp(s - lse[..., None]), 0.0)
        out = torch.matmul(p, values.float())
    out, lse = out.float().reshape(b, hq, n_q, d), lse.float().reshape(b, hq, n_q)
    lse = lse.masked_fill(none[:, None, :], float("-inf"))
    out = out.masked_fill(none[:, None, :, None], 0.0)  # whatever a kernel gives a row with no key at all
    return out, lse


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


def attend_lse_staircase(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor, scale: float, block: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attend_lse`` for queries and keys both sorted by position, where each query reads a prefix of the keys
    (a staircase): queries go in blocks of ``block``, each over the key prefix its last query can read, so the
    keys after a block are never multiplied (about half the products of one rectangle). Same arguments."""
    n = q.shape[2]
    if n <= block:
        return attend_lse(q, keys, values, allowed, scale)
    outs, lses = [], []
    for a in range(0, n, block):
        reach = allowed[:, a : a + block].any(1)  # [B, K]: keys some query of the block reads
        width = int((reach * torch.arange(1, reach.shape[1] + 1, device=reach.device)).max())
        o, lse = attend_lse(q[:, :, a : a + block], keys[:, :, :width], values[:, :, :width],
                            allowed[:, a : a + block, :width], scale)
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

    The queries go in blocks of R = ``vis.recent``: block c reads the ``2R - 1`` sources that its queries' bands
    cover, one batched masked attention for all blocks (about 2R products per query, never N).
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
    blocks, win = -(-n // r), 2 * r - 1
    extra = blocks * r + r - 1 - keys.shape[2]  # pad the sources so that the last block has its window
    pad = (0, extra)
    keys, values = F.pad(keys, (0, 0, *pad)), F.pad(values, (0, 0, *pad))
    cols, idx, live = F.pad(cols, pad), F.pad(idx, pad), F.pad(live, pad)
    qp = blocks * r - n
    q = F.pad(q, (0, 0, 0, qp))
    q_pos, q_idx, q_valid = F.pad(q_pos, (0, qp)), F.pad(q_idx, (0, qp)), F.pad(q_valid, (0, qp))

    def windows(x: torch.Tensor, dim: int) -> torch.Tensor:  # [.., S, ..] -> [.., blocks, .., win] (a view)
        return x.unfold(dim, win, r)

    kb = windows(keys, 2).permute(0, 2, 1, 4, 3).reshape(b * blocks, h, win, d)
    vb = windows(values, 2).permute(0, 2, 1, 4, 3).reshape(b * blocks, h, win, d)
    qb = q.reshape(b, hq, blocks, r, d).transpose(1, 2).reshape(b * blocks, hq, r, d)
    ok = windows(live, 1)[:, :, None, :] & q_valid.view(b, blocks, r, 1)  # [B, blocks, R, win]
    ok &= vis.in_window(q_pos.view(b, blocks, r, 1), windows(cols, 1)[:, :, None, :])
    ok &= vis.in_band(q_idx.view(b, blocks, r, 1), windows(idx, 1)[:, :, None, :])
    out, lse = attend_lse(qb, kb, vb, ok.reshape(b * blocks, r, win), scale)
    out = out.view(b, blocks, hq, r, d).transpose(1, 2).reshape(b, hq, blocks * r, d)[:, :, :n]
    lse = lse.view(b, blocks, hq, r).transpose(1, 2).reshape(b, hq, blocks * r)[:, :, :n]
    return out, lse, ok.sum()


def merge_lse(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Softmax attention over the union of two disjoint key sets, from each part's output ``[B, Hq, N, d]``
    and log-sum-exp ``[B, Hq, N]``. A query with no key in either part gets 0."""
    m = torch.maximum(lse_a, lse_b).clamp_min(-1e30)[..., None]
    wa, wb = torch.exp(lse_a[..., None] - m), torch.exp(lse_b[..., None] - m)
    return (wa * out_a + wb * out_b) / (wa + wb).clamp_min(1e-30)


class FilteredAttention:
    """Replacement forward for one layer's attention module (see the module docstring)."""

    def __init__(self, run: FilterRun, layer_idx: int, attn: nn.Module, target: float) -> None:
        self.run, self.idx, self.attn = run, layer_idx, attn
        self.cfg = run.config
        self.target = target  # ratio of this layer (ratio mode) or its threshold (threshold mode)
        self.window = sliding_window(attn)
        self.vis = Visibility.for_layer(self.cfg, self.window)
        self.units = Units.for_layer(self.cfg, attn.k_proj.out_features // attn.head_dim)
        self.fast = self.cfg.path == "fast"
        self.score = SCORES[self.cfg.score]
        self.score_step = fused_score(self.cfg.score)  # the lean decode paths' fused version, if there is one

    def __call__(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, None]:
        attn, call = self.attn, self.run.call
        cache = cache_argument(kwargs)
        if cache is None and call.cache is not None:
            raise RuntimeError(
                f"Layer {self.idx}'s attention received no cache although the model was given one: this "
                f"transformers version ({transformers.__version__}) passes it in a way Token Filtering does not "
                "know; install a transformers version that tokenfilter supports (see pyproject.toml)."
            )
        b, t, _ = hidden_states.shape
        d = attn.head_dim
        real = call.real
        cos, sin = position_embeddings
        if cos.shape[0] != b:
            cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)

        k = attn.k_proj(hidden_states).view(b, t, -1, d)
        if getattr(attn, "k_norm", None) is not None:
            k = attn.k_norm(k)
        v = attn.v_proj(hidden_states).view(b, t, -1, d)
        # per-head decisions: one row per (sequence, KV head); everything up to the attention runs on rows
        units = self.units
        k, v, real, cos_k, sin_k = units.kv(k), units.kv(v), units.rows(real), units.rows(cos), units.rows(sin)

        state = self._state(cache, k.shape[0], k.shape[2], d, hidden_states.device)
        if state.columns != call.past:
            raise RuntimeError(
                f"Layer {self.idx} holds the state of {state.columns} earlier columns but this call continues "
                f"after {call.past}: the cache is not the one Token Filtering filled (transformers "
                f"{transformers.__version__}); start from an empty cache inside the `with` block."
            )
        decoding = t == 1 and state.columns > 0
        if (
            decoding
            and self.fast
            and isinstance(state.kv, RaggedKV)
            and call.all_real
            and state.min_real_seen >= self.cfg.warmup
            and (self.window is None or state.columns < self.window)
        ):
            lean = self._decode_step if state.ring is None else self._decode_step_band
            return lean(hidden_states, k, v, cos, sin, state)
        k_rot = rope(k, cos_k, sin_k)
        cols = state.columns + torch.arange(t, device=hidden_states.device)
        idx = state.real_seen[:, None] + real.long().cumsum(-1) - 1  # [B, T] index among the row's real tokens
        scores, eligible = self._score(k if self.cfg.pre_rope else k_rot, v, real, state)
        filtered = self._decide(scores, eligible, real, state, decoding)
        vis, keep = self.vis, real & ~filtered
        readers, stored = vis.readers(real, keep), vis.stored(real, keep)
        fresh = isinstance(state.kv, RaggedKV) and state.kv.total == 0
        k_rot, v = k_rot.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, d]
        state.kv.append(k_rot, v, cols, stored, real=real, idx=idx)
        held_before = state.ring.held if state.ring is not None else 0
        band = self._advance_ring(state, k_rot, v, cols, idx, real, stored)
        held_after = state.ring.held if state.ring is not None else 0
        state.columns += t

        q_sel = None
        if self.fast:
            # stored == queries when the store was empty and exactly the reading tokens are stored
            causal = fresh and (self.window is None or t <= self.window)
            causal = causal and (vis.stored_are_readers or torch.equal(readers, stored))
            out, pairs, q_sel = self._attend_fast(hidden_states, readers, cols, idx, cos, sin, state, causal, band)
        else:
            out, pairs = self._attend_reference(hidden_states, readers, cols, idx, cos, sin, state)
        token_readers = units.any_unit(readers)
        call.keep[self.idx] = (token_readers, q_sel)
        # an entry not stored for good is dropped when it leaves the ring (at once without a band)
        dropped = held_before + int((real & ~stored).sum()) - held_after
        self.run.record_layer(
            self.idx,
            filtered=units.per_sequence(filtered),
            pairs=pairs,
            dropped=dropped,
            qo_skipped=int((call.real & ~token_readers).sum()),
            scores=units.per_sequence(scores),
        )
        return out, None

    def _advance_ring(
        self,
        state: FilteredCacheLayer,
        k: torch.Tensor,
        v: torch.Tensor,
        cols: torch.Tensor,
        idx: torch.Tensor,
        real: torch.Tensor,
        stored: torch.Tensor,
    ) -> tuple[torch.Tensor, ...] | None:
        """Slide the layer's ring over this call's real tokens (``k, v``: ``[B, H, T, d]``; the rest ``[B, T]``,
        ``cols`` ``[T]``); return the band's sources (``RecentRing.extend``), or None without a band."""
        ring = state.ring
        if ring is None:
            return None
        b, t = real.shape
        if self.run.call.all_real:  # already left-aligned: nothing to gather
            return ring.extend(k, v, cols.expand(b, t), idx, ~stored, None)
        order, valid, _ = compact_order(real)
        live = (real & ~stored).gather(1, order) & valid
        k_c = v_c = None
        if ring.with_values:
            k_c = gather_rows(k.transpose(1, 2), order).transpose(1, 2)
            v_c = gather_rows(v.transpose(1, 2), order).transpose(1, 2)
        return ring.extend(k_c, v_c, cols[order], idx.gather(1, order), live, valid.sum(-1))

    # -- state -----------------------------------------------------------------------------------
    def _state(self, cache: object | None, b: int, heads: int, d: int, device: torch.device) -> FilteredCacheLayer:
        if cache is None:  # use_cache=False: state for this call only
            layer = self.run.call.transient.setdefault(self.idx, self._new_layer())
        else:
            layers = cache.layers
            while len(layers) <= self.idx:
                layers.append(cache.layer_class_to_replicate())
            layer = layers[self.idx]
            if not isinstance(layer, FilteredCacheLayer):
                if layer.get_seq_length() > 0:
                    raise ValueError(
                        "This cache was filled without Token Filtering; start from an empty cache inside the "
                        "`with TokenFilter(...).apply(model)` block."
                    )
                layer = self._new_layer()
                layers[self.idx] = layer
        layer.init_state(b, heads, d, device)
        return layer

    def _new_layer(self) -> FilteredCacheLayer:
        return FilteredCacheLayer(ragged=self.fast, ring=self.vis.ring if self.vis.recent else None, units=self.units)

    # -- scores and decisions ----------------------------------------------------------------------
    def _score(
        self, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor, state: FilteredCacheLayer
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``[B, T]`` (NaN for padding) and eligibility ``[B, T]``; advances the score's state and counts."""
        b, t = real.shape
        if self.run.call.all_real:  # no padding: the tokens are already left-aligned, nothing to gather
            order, valid, n = None, None, t
        else:
            order, valid, n = compact_order(real)
            if n == 0:
                nan = torch.full((b, t), float("nan"), device=k.device)
                return nan, torch.zeros(b, t, dtype=torch.bool, device=k.device)
            k, v = gather_rows(k, order), gather_rows(v, order)  # the real tokens, left-aligned: [B, N, H, d]
        seen = state.real_seen
        s = self.score(k, v, self._score_state(state, valid))
        index = seen[:, None] + torch.arange(n, device=k.device)[None, :]  # each real token's index in its row
        if order is None:
            state.real_seen = seen + t
            state.min_real_seen += t  # every row gained t real tokens
            return s, index >= self.cfg.warmup

        state.real_seen = seen + valid.sum(-1)
        if state.min_real_seen < self.cfg.warmup:  # a lower bound; once past warm-up it needs no more syncs
            state.min_real_seen = int(state.real_seen.min())
        scores = torch.full((b, t), float("nan"), device=k.device)
        eligible = torch.zeros(b, t, dtype=torch.bool, device=k.device)
        scores.scatter_(1, order, s.masked_fill(~valid, float("nan")))
        eligible.scatter_(1, order, valid & (index >= self.cfg.warmup))
        return scores, eligible

    def _score_one(self, k: torch.Tensor, v: torch.Tensor, state: FilteredCacheLayer) -> torch.Tensor:
        """Scores ``[B]`` of a lean decode step (one real token per row, every row past warm-up): the fused
        version of the score where there is one (``integration/fused.py``), else the registry's."""
        if self.score_step is not None:
            cfg = self.cfg
            scores = self.score_step(k, v, state.score_memory, state.real_seen, cfg.gamma, cfg.fusion, cfg.lam)
            if scores is not None:
                return scores
        return self.score(k, v, self._score_state(state, None))[:, 0]

    def _score_state(self, state: FilteredCacheLayer, valid: torch.Tensor | None) -> ScoreState:
        cfg = self.cfg
        return ScoreState(
            valid=valid,
            seen=state.real_seen,
            memory=state.score_memory,
            gamma=cfg.gamma,
            fusion=cfg.fusion,
            lam=cfg.lam,
            generator=self.run.generator,
        )

    def _decide(
        self,
        scores: torch.Tensor,
        eligible: torch.Tensor,
        real: torch.Tensor,
        state: FilteredCacheLayer,
        decoding: bool,
    ) -> torch.Tensor:
        if self.cfg.mode == "threshold":
            return above(scores, eligible, self.target)
        if decoding:
            filtered = above(scores, eligible, state.score_quantile(1 - self.target))
        else:
            filtered = top_ratio(scores, eligible, real.sum(-1), self.target)
        state.add_history(scores, eligible)
        return filtered

    # -- attention ---------------------------------------------------------------------------------
    def _queries(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``h``: ``[B, Q, D]`` -> queries with RoPE ``[B, Hq, Q, d]``."""
        attn = self.attn
        q = attn.q_proj(h).view(*h.shape[:2], -1, attn.head_dim)
        if getattr(attn, "q_norm", None) is not None:
            q = attn.q_norm(q)
        return rope(q, cos, sin).transpose(1, 2)

    def _attend_fast(
        self,
        h: torch.Tensor,
        readers: torch.Tensor,
        cols: torch.Tensor,
        idx: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        state: FilteredCacheLayer,
        causal: bool = False,
        band: tuple[torch.Tensor, ...] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Only the reading tokens are gathered and computed: attention over the stored entries, and where the
        layer has a band, over the band's other entries too, merged by log-sum-exp (each pair once)."""
        b, t, dim = h.shape
        sel, q_valid, n = compact_order(readers)
        if n == 0:
            return h.new_zeros(b, t, dim), torch.zeros((), dtype=torch.long), None
        all_read = n == t and bool(q_valid.all())
        if all_read:  # nothing to gather
            hs, cs, ss, q_pos, q_idx = h, cos, sin, cols.expand(b, t), idx
        else:
            hs, cs, ss, q_pos = gather_rows(h, sel), gather_rows(cos, sel), gather_rows(sin, sel), cols[sel]
            q_idx = idx.gather(1, sel)
        q = self._queries(hs, cs, ss)
        keys, values, k_pos, k_valid = state.kv.view()
        scale = self.attn.scaling
        if band is None or not bool(band[4].any()):  # nothing only the band reads: the stored entries are all
            o, pairs = attend(q, q_pos, q_valid, keys, values, k_pos, k_valid, scale, self.vis, causal=causal)
        else:  # the readers are the call's real tokens, in the order the band's sources list them
            allowed = k_valid[:, None, :] & self.vis.in_window(q_pos[:, :, None], k_pos[:, None, :])
            o_kept, lse_kept = attend_lse_staircase(q, keys, values, allowed, scale)
            o_band, lse_band, band_pairs = attend_band(q, q_pos, q_idx, q_valid, band, scale, self.vis)
            o = merge_lse(o_kept, lse_kept, o_band, lse_band).to(q.dtype)
            pairs = (allowed & q_valid[:, :, None]).sum() + band_pairs
        o = self.attn.o_proj(o.transpose(1, 2).reshape(b, n, -1))
        if all_read:
            return o, pairs, None
        o = o * q_valid[..., None].to(o.dtype)
        out = h.new_zeros(b, t, dim)
        out.scatter_(1, sel[..., None].expand(-1, -1, dim), o)
        return out, pairs, (sel, q_valid)

    def _decode_step_band(
        self,
        h: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        state: FilteredCacheLayer,
    ) -> tuple[torch.Tensor, None]:
        """``_decode_step`` for a layer with a recent band (KV side), under the same conditions: every row's token
        reads the stored entries and the ring's live ones plus its own if it is filtered, every entry being in the
        past and in the model's window. Two attentions merged by log-sum-exp, no compaction or mask building."""
        cfg, b = self.cfg, h.shape[0]
        k_rot = rope(k, cos, sin)  # [B, 1, H, d]
        index = state.real_seen  # this token's index among its row's real tokens
        scores = self._score_one(k if cfg.pre_rope else k_rot, v, state)
        state.real_seen = index + 1
        state.min_real_seen += 1
        if cfg.mode == "threshold":
            filtered = scores > self.target
        else:
            filtered = scores > state.score_quantile(1 - self.target)[:, 0]
            state.add_history_one(scores)
        n_keep = b - int(filtered.sum())
        if n_keep:
            state.kv.append_one(k_rot[:, 0], v[:, 0], state.columns, None if n_keep == b else ~filtered, n_keep)
        ring, held_before = state.ring, state.ring.held
        col = torch.full((b, 1), state.columns, dtype=torch.long, device=h.device)
        band = ring.extend(k_rot.transpose(1, 2), v.transpose(1, 2), col, index[:, None], filtered[:, None], None)
        state.columns += 1

        q = self._queries(h, cos, sin)  # [B, Hq, 1, d]
        keys, values, mask = state.kv.lean_view()
        scale = self.attn.scaling
        band_keys, band_values, _, _, live = band
        n_live = int(live.sum())
        if n_live == 0:
            o = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != keys.shape[1]
            )
        else:
            stored = torch.ones(b, 1, keys.shape[2], dtype=torch.bool, device=h.device) if mask is None else mask[:, 0]
            o_kept, lse_kept = attend_lse(q, keys, values, stored, scale)
            o_band, lse_band = attend_lse(q, band_keys, band_values, live[:, None, :], scale)
            o = merge_lse(o_kept, lse_kept, o_band, lse_band).to(q.dtype)
        out = self.attn.o_proj(o.transpose(1, 2).reshape(b, 1, -1))
        pairs = state.kv.total + n_live  # every row reads all its stored entries and its band's live ones
        dropped = held_before + (b - n_keep) - ring.held
        if cfg.record_decisions:
            self.run.record_layer(
                self.idx, filtered=filtered[:, None], pairs=pairs, dropped=dropped, qo_skipped=0, scores=scores[:, None]
            )
        else:
            self.run.record_counts(self.idx, filtered=b - n_keep, pairs=pairs, dropped=dropped, qo_skipped=0)
        return out, None

    def _decode_step(
        self,
        h: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        state: FilteredCacheLayer,
    ) -> tuple[torch.Tensor, None]:
        """One decode step when every row's token is real and past warm-up: the same scores, anchors,
        decisions, cache entries and outputs as the general path, with far fewer operators."""
        cfg, b, dim = self.cfg, h.shape[0], h.shape[2]
        k_rot = None if cfg.pre_rope else rope(k, cos, sin)  # else only if the entry is stored (below)
        scores = self._score_one(k if cfg.pre_rope else k_rot, v, state)
        state.real_seen = state.real_seen + 1
        state.min_real_seen += 1
        if cfg.mode == "threshold":
            filtered = scores > self.target
        else:
            filtered = scores > state.score_quantile(1 - self.target)[:, 0]
            state.add_history_one(scores)
        if b == 1:
            keep = None
            n_keep = 0 if filtered.item() else 1
        else:
            keep = ~filtered
            n_keep = int(keep.sum())
        if keep is None and (n_keep < b or cfg.record_decisions or cfg.skip == "block"):
            keep = ~filtered
        drop = not self.vis.filtered_stored
        n_store = n_keep if drop else b
        store = keep if drop and n_keep < b else None
        if n_store:
            k_rot = rope(k, cos, sin) if k_rot is None else k_rot
            state.kv.append_one(k_rot[:, 0], v[:, 0], state.columns, store, n_store)
        state.columns += 1

        if n_keep == 0:
            out, pairs = h.new_zeros(b, 1, dim), 0
        else:
            q = self._queries(h, cos, sin)  # [B, Hq, 1, d]
            keys, values, mask = state.kv.lean_view()  # every entry is in the past (and in the window)
            o = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=self.attn.scaling, enable_gqa=q.shape[1] != keys.shape[1]
            )
            out = self.attn.o_proj(o.transpose(1, 2).reshape(b, 1, -1))
            if n_keep == b:
                pairs = state.kv.total  # every row attends to all its entries (its own included)
            else:
                out = out * keep[:, None, None].to(out.dtype)
                pairs = int((state.kv.lengths * keep).sum())
        if cfg.skip == "block":  # what FilteredMLP reads
            mixed = 0 < n_keep < b
            q_sel = (torch.zeros(b, 1, dtype=torch.long, device=h.device), keep[:, None]) if mixed else None
            self.run.call.keep[self.idx] = (keep[:, None], q_sel)
        if cfg.record_decisions:
            self.run.record_layer(
                self.idx,
                filtered=filtered[:, None],
                pairs=torch.tensor(pairs),
                dropped=b - n_keep if drop else 0,
                qo_skipped=b - n_keep,
                scores=scores[:, None],
            )
        else:
            self.run.record_counts(
                self.idx, filtered=b - n_keep, pairs=pairs, dropped=b - n_keep if drop else 0, qo_skipped=b - n_keep
            )
        return out, None

    def _attend_reference(
        self,
        h: torch.Tensor,
        readers: torch.Tensor,
        cols: torch.Tensor,
        idx: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        state: FilteredCacheLayer,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token computed, over every column, masked by the whole rule (``Visibility.allowed``). ``h, cos,
        sin`` per sequence; ``readers, idx`` and the layer's store per row (``Units``)."""
        b, t, _ = h.shape
        q = self.units.queries(self._queries(h, cos, sin))  # [rows, Hq / per, T, d]
        keys, values, k_col, k_stored, k_real, k_idx = state.kv.view_all()
        allowed = self.vis.allowed(cols.expand(readers.shape[0], t), idx, k_col, k_idx, k_real, k_stored)
        pairs = (allowed & readers[:, :, None]).sum()
        allowed = allowed | ~allowed.any(-1, keepdim=True)  # rows of padding queries: any finite output
        o = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=allowed[:, None], scale=self.attn.scaling,
            enable_gqa=q.shape[1] != keys.shape[1],
        )
        o = self.attn.o_proj(self.units.outputs(o).transpose(1, 2).reshape(b, t, -1))
        return o * self.units.any_unit(readers)[..., None].to(o.dtype), pairs


class FilteredMLP:
    """Replacement MLP forward for ``skip="block"``: filtered tokens skip the MLP too (zero output)."""

    def __init__(self, run: FilterRun, layer_idx: int, mlp: nn.Module) -> None:
        self.run, self.idx, self.mlp = run, layer_idx, mlp
        self.original = type(mlp).forward

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        keep, q_sel = self.run.call.keep[self.idx]
        if self.run.config.path == "reference":
            return self.original(self.mlp, x) * keep[..., None].to(x.dtype)
        b, t, dim = x.shape
        if q_sel is None:  # nothing filtered (or nothing kept) in this call
            return self.original(self.mlp, x) if bool(keep.any()) else x.new_zeros(b, t, dim)
        sel, q_valid = q_sel
        y = self.original(self.mlp, gather_rows(x, sel)) * q_valid[..., None].to(x.dtype)
        out = x.new_zeros(b, t, dim)
        out.scatter_(1, sel[..., None].expand(-1, -1, dim), y)
        return out
