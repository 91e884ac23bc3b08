"""The budget backend: a layer under a KV budget (``TokenFilter(budget=N)``, ``Visibility.slots``) on the fast path.

Its store (``BudgetKV``) holds at most N entries per row. A call's real tokens are read in blocks of ``BLOCK``
queries; each block attends over a pool of the held entries and its own tokens (at most ``N + BLOCK`` keys, masked
by the read rule ``Visibility.allowed``), then the store keeps what ``Visibility.held`` keeps for each row's next
token. So a prefill costs ``O(T * (N + BLOCK))`` rather than ``O(T^2)``, and reads as a token-by-token decode would
(``stored_at`` ranks a pool as it would rank every key: the slots only ever lose members).

A decode step with one real token per row (``_step``) needs neither the pool nor the ranking: the entries held are
exactly what the new token reads besides itself, so it is written into a free slot of a buffer of ``N + 1`` slots,
attends over the held ones, and then at most one entry leaves: the most redundant key past the band, when more than
``slots`` are. No copy of the held entries, no sort.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from tokenfilter.algorithm.visibility import Visibility
from tokenfilter.integration.backends.base import Projections, QuerySelection, Reading, attend_pads
from tokenfilter.integration.backends.kernels import attend_masked, compact_order, gather_rows, scatter_rows
from tokenfilter.integration.kv_store import BudgetKV
from tokenfilter.integration.units import Units

BLOCK = 128  # queries per block: the pool is the held entries plus this many


class BudgetBackend:
    name: ClassVar[str] = "budget"
    lean: ClassVar[bool] = False
    ring_values: ClassVar[bool] = False

    def supports(self, units: Units, vis: Visibility) -> str | None:
        if units.per > 1 or vis.slots is None:
            return "the budget backend runs layers under a KV budget with per-token decisions only"
        return None

    def new_kv(self) -> BudgetKV:
        return BudgetKV()

    def attend(
        self, r: Reading, proj: Projections, vis: Visibility, units: Units, kv: BudgetKV
    ) -> tuple[torch.Tensor, torch.Tensor | int, QuerySelection]:
        k, v, cols, real, idx, scores = kv.pending  # the call: [B, H, T, d] and [T], [B, T]
        kv.pending = None
        b, t, dim = r.h.shape
        if t == 1 and r.pads is None and kv.valid.shape[1] > capacity(vis) and bool(r.readers.all()):
            return self._step(r, proj, vis, kv, k, v, cols, idx, scores)
        before = kv.total
        sel, q_valid, n = compact_order(real)
        all_read = n == t and bool(q_valid.all())
        if all_read:  # no padding: nothing to gather
            h, cos, sin, q_col, q_idx, score = r.h, r.cos, r.sin, cols.expand(b, t), idx, scores
        else:
            h, cos, sin = gather_rows(r.h, sel), gather_rows(r.cos, sel), gather_rows(r.sin, sel)
            g = sel[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            k, v = k.gather(2, g), v.gather(2, g)
            q_col, q_idx, score = cols[sel], idx.gather(1, sel), scores.gather(1, sel)
        out = r.h.new_zeros(b, t, dim)
        pairs: torch.Tensor | int = 0
        if n:
            q = proj.queries(h, cos, sin)  # [B, Hq, n, d]
            parts = []
            for s in range(0, n, BLOCK):
                e = min(n, s + BLOCK)
                o, p = self._block(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], q_col[:, s:e], q_idx[:, s:e],
                                   score[:, s:e], q_valid[:, s:e], proj.scale, vis, kv)
                parts.append(o)
                pairs = pairs + p
            o = proj.output(torch.cat(parts, dim=2))
            out = o if all_read else scatter_rows(o, sel, q_valid, t)
        kv.evicted += before + int(q_valid.sum()) - kv.total
        selection = None if all_read else (sel, q_valid)
        if r.pads is not None:
            # what the row holds after the call: what its next token would find
            out = out + attend_pads(r, proj, vis, kv.keys, kv.values, kv.cols, kv.valid)
            selection = compact_order(r.readers | r.pads)[:2]
        return out, pairs, selection

    def _block(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_col: torch.Tensor, q_idx: torch.Tensor,
        score: torch.Tensor, valid: torch.Tensor, scale: float, vis: Visibility, kv: BudgetKV,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One block of queries (``q`` ``[B, Hq, Q, d]``; their keys ``k, v`` ``[B, H, Q, d]``, the rest ``[B, Q]``)
        over the held entries and themselves; then the store keeps what each row's next token finds held."""
        pool_k, pool_v = torch.cat([kv.keys, k], dim=2), torch.cat([kv.values, v], dim=2)
        pool_col, pool_idx = torch.cat([kv.cols, q_col], dim=1), torch.cat([kv.idx, q_idx], dim=1)
        pool_score, pool_real = torch.cat([kv.score, score], dim=1), torch.cat([kv.valid, valid], dim=1)
        allowed = vis.allowed(q_col, q_idx, pool_col, pool_idx, pool_real, None, pool_score) & valid[:, :, None]
        pairs = allowed.sum()
        o = attend_masked(q, pool_k, pool_v, allowed, scale)
        kv.seen = kv.seen + valid.sum(-1)
        keep = vis.held(kv.seen, pool_idx, pool_score, pool_real)
        kv.hold(keep, pool_k, pool_v, pool_col, pool_idx, pool_score, capacity=capacity(vis) + 1)
        return o, pairs

    def _step(
        self, r: Reading, proj: Projections, vis: Visibility, kv: BudgetKV, k: torch.Tensor, v: torch.Tensor,
        cols: torch.Tensor, idx: torch.Tensor, scores: torch.Tensor,
    ) -> tuple[torch.Tensor, int, QuerySelection]:
        """A decode step (one real token per row; ``k, v`` ``[B, H, 1, d]``, ``idx, scores`` ``[B, 1]``) on a store
        of more than N slots, where one is free in every row."""
        b = k.shape[0]
        rows = torch.arange(b, device=k.device)
        slot = (~kv.valid).to(torch.int8).argmax(-1)  # a free slot per row
        kv.keys[rows, :, slot] = k[:, :, 0]
        kv.values[rows, :, slot] = v[:, :, 0]
        kv.cols[rows, slot], kv.idx[rows, slot], kv.score[rows, slot] = cols[0], idx[:, 0], scores[:, 0]
        kv.valid[rows, slot] = True
        mask = kv.valid if vis.window is None else kv.valid & vis.in_window(cols[0], kv.cols)
        q = proj.queries(r.h, r.cos, r.sin)  # [B, Hq, 1, d]
        o = F.scaled_dot_product_attention(
            q, kv.keys, kv.values, attn_mask=mask[:, None, None, :], scale=proj.scale,
            enable_gqa=q.shape[1] != kv.keys.shape[1],
        )
        kv.seen = kv.seen + 1
        # the key leaving the band joins the slots; past ``slots`` of them, the most redundant leaves (the older of
        # equals): what ``Visibility.held`` keeps for the next token
        cand = kv.valid & (kv.idx >= vis.sinks) & (kv.idx <= kv.seen[:, None] - vis.recent)
        score = kv.score.nan_to_num(nan=float("inf")).masked_fill(~cand, float("-inf"))
        top = score.max(-1, keepdim=True).values
        victim = kv.idx.masked_fill(~(cand & (score == top)), torch.iinfo(torch.long).max).argmin(-1)
        evict = cand.sum(-1) > vis.slots
        kv.valid[rows, victim] &= ~evict
        pairs, n_evicted, held_max = torch.stack([mask.sum(), evict.sum(), kv.valid.sum(-1).max()]).tolist()
        kv.total += b - n_evicted
        kv.evicted += n_evicted
        kv.peak_held = max(kv.peak_held or 0, held_max)
        return proj.output(o), pairs, None


def capacity(vis: Visibility) -> int:
    """N: the entries a layer under a budget holds at most (sinks, band before the next token, slots)."""
    return vis.sinks + vis.recent - 1 + vis.slots
