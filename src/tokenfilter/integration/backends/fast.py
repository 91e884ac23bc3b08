"""The fast backend (CPU, and any device SDPA runs on): only the reading tokens are gathered and computed, over
the stored entries only (``RaggedKV``: each row's kept entries, left-aligned), plus, on the KV side, each query's
recent band merged by log-sum-exp; the outputs are scattered back (0 for a token that does not read).

Two shortcuts compute the same thing with less work:
* a prefill into an empty store whose stored tokens are exactly the queries (query side with ``kv="drop"``, or
  nothing filtered) is plain causal attention over the compacted rows: SDPA with ``is_causal=True``;
* a lean decode step (``Reading.lean``: one token per row, every stored entry readable) needs no compaction,
  gathers or scatters, and no mask when every row stores the same number of entries.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from tokenfilter.algorithm.visibility import Visibility
from tokenfilter.integration.backends.base import Projections, QuerySelection, Reading, attend_pads
from tokenfilter.integration.backends.kernels import (
    attend,
    attend_band,
    attend_lse,
    attend_lse_ranges,
    attend_masked,
    compact_order,
    gather_rows,
    key_ranges,
    merge_lse,
    scatter_rows,
)
from tokenfilter.integration.kv_store import RaggedKV
from tokenfilter.integration.units import Units


class FastBackend:
    name: ClassVar[str] = "fast"
    lean: ClassVar[bool] = True
    ring_values: ClassVar[bool] = True

    def supports(self, units: Units, vis: Visibility) -> str | None:
        if units.per > 1:
            return "the fast backend runs per-token decisions only (granularity='head' runs on the reference backend)"
        return None

    def new_kv(self) -> RaggedKV:
        return RaggedKV()

    def attend(
        self, r: Reading, proj: Projections, vis: Visibility, units: Units, kv: RaggedKV
    ) -> tuple[torch.Tensor, torch.Tensor | int, QuerySelection]:
        if r.lean:
            return self._attend_one(r, proj, kv)
        if r.pads is not None and not r.aligned:  # padding between real tokens: the padding columns apart
            out, pairs, _ = self._attend_readers(r, proj, vis, kv, fold_pads=False)
            return out + attend_pads(r, proj, vis, *kv.view()), pairs, compact_order(r.readers | r.pads)[:2]
        return self._attend_readers(r, proj, vis, kv, fold_pads=r.pads is not None)

    def _attend_readers(
        self, r: Reading, proj: Projections, vis: Visibility, kv: RaggedKV, fold_pads: bool
    ) -> tuple[torch.Tensor, torch.Tensor | int, QuerySelection]:
        """The reading tokens, gathered: over the stored entries, and the band's other entries merged by lse.
        With ``fold_pads`` (right padding: the padding columns come after their row's real tokens) the padding
        columns are queries of the same calls, reading the stored entries only (no band, not counted); a right-padded
        batch then needs no gather at all."""
        b, t, dim = r.h.shape
        computed = r.readers | r.pads if fold_pads else r.readers
        aligned = vis.filtered_reads and r.aligned  # every real token reads, and they lead their rows: no sort
        if r.all_read:  # every column reads: nothing to count or gather
            sel, q_valid, n, all_read = None, r.readers, t, True
        else:
            sel, q_valid, n = compact_order(computed, aligned)
            if n == 0:
                return r.h.new_zeros(b, t, dim), torch.zeros((), dtype=torch.long), None
            all_read = n == t and bool(q_valid.all())
        if all_read:  # nothing to gather
            hs, cs, ss, q_pos, q_idx = r.h, r.cos, r.sin, r.cols.expand(b, t), r.idx
            q_read = r.readers
        else:
            hs, cs, ss = (gather_rows(x, sel, aligned) for x in (r.h, r.cos, r.sin))
            q_pos = r.cols[sel]
            q_idx = r.idx.gather(1, sel)
            q_read = r.readers.gather(1, sel) & q_valid if fold_pads else q_valid
        q = proj.queries(hs, cs, ss)
        keys, values, k_pos, k_valid = kv.view()
        within_band = r.fresh and (vis.window is None or t <= vis.window)
        read_counts = r.readers.sum(-1) if fold_pads and r.band_live and within_band else None
        n_read = n if read_counts is None else int(read_counts.max())  # the padding columns are not in the band
        if r.band_live == 0:  # nothing only the band reads: the stored entries are all
            # stored == queries when the store was empty and exactly the reading tokens are stored
            causal = not fold_pads and within_band and (vis.stored_are_readers or torch.equal(r.readers, r.stored))
            o, pairs = attend(q, q_pos, q_valid, keys, values, k_pos, k_valid, proj.scale, vis, causal=causal,
                              counted=q_read)
        elif within_band and n_read <= vis.recent:
            o, pairs = self._attend_within_band(q, q_pos, q_valid, q_idx, q_read, r, proj, vis, n_read, read_counts)
        else:  # the readers are the call's real tokens, in the order the band's sources list them (padding after)
            lo, hi = key_ranges(q_pos, q_valid, k_pos, k_valid, vis.window)  # the stored keys each query reads
            o_kept, lse_kept = attend_lse_ranges(q, keys, values, lo, hi, q_valid, proj.scale)
            o_band, lse_band, band_pairs = attend_band(q, q_pos, q_idx, q_read, r.band, proj.scale, vis)
            o = merge_lse(o_kept, lse_kept, o_band, lse_band).to(q.dtype)
            pairs = ((hi - lo) * q_read).sum() + band_pairs
        o = proj.output(o)
        if all_read:  # every column of every row computed
            return o, pairs, None
        return scatter_rows(o, sel, q_valid, t), pairs, (sel, q_valid)

    def _attend_within_band(
        self, q: torch.Tensor, q_pos: torch.Tensor, q_valid: torch.Tensor, q_idx: torch.Tensor, q_read: torch.Tensor,
        r: Reading, proj: Projections, vis: Visibility, n: int, read_counts: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A first call no longer than the band: every query reads every real token before it (kept, or filtered
        but in its band), so the attention is plain causal attention over the call's tokens (the band's sources
        after the empty ring, compacted as the queries are), whatever was decided. Folded padding columns read only
        the stored ones among them: one mask, by real-token index (``read_counts`` ``[B]``: each row's real tokens)."""
        keys, values = r.band[0][:, :, -n:], r.band[1][:, :, -n:]
        if read_counts is None:
            return attend(q, q_pos, q_valid, keys, values, None, None, proj.scale, vis, causal=True)
        k_idx, k_live = r.band[3][:, -n:], r.band[4][:, -n:]
        k_real = torch.arange(n, device=q.device)[None, :] < read_counts[:, None]
        allowed = k_real[:, None, :] & (k_idx[:, None, :] <= q_idx[:, :, None])
        allowed &= q_read[:, :, None] | ~k_live[:, None, :]  # padding columns: stored entries only
        allowed &= q_valid[:, :, None]
        pairs = (allowed & q_read[:, :, None]).sum()
        return attend_masked(q, keys, values, allowed, proj.scale), pairs

    def _attend_one(self, r: Reading, proj: Projections, kv: RaggedKV) -> tuple[torch.Tensor, int, QuerySelection]:
        """A lean decode step: each reading row's query over all its stored entries (and its band's live ones,
        merged by log-sum-exp), no compaction and no mask building; a row that does not read gets 0."""
        b, _, dim = r.h.shape
        n = r.n_readers
        if n == 0:
            return r.h.new_zeros(b, 1, dim), 0, None
        q = proj.queries(r.h, r.cos, r.sin)  # [B, Hq, 1, d]
        n_live = r.band_live
        if n_live and kv.min_len == kv.max_len:  # the band beside the stored entries: one call reads both
            band_keys, band_values, _, _, live = r.band
            keys, values, mask = kv.lean_view_with_band(band_keys, band_values, live)
            o = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=proj.scale, enable_gqa=q.shape[1] != keys.shape[1]
            )
        elif n_live == 0:
            keys, values, mask = kv.lean_view()  # every entry is in the past (and in the window)
            o = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=proj.scale, enable_gqa=q.shape[1] != keys.shape[1]
            )
        else:  # rows holding different numbers of entries: the band apart, merged by log-sum-exp
            keys, values, mask = kv.lean_view()
            band_keys, band_values, _, _, live = r.band
            o_kept, lse_kept = attend_lse(q, keys, values, None if mask is None else mask[:, 0], proj.scale)
            o_band, lse_band = attend_lse(q, band_keys, band_values, live[:, None, :], proj.scale)
            o = merge_lse(o_kept, lse_kept, o_band, lse_band).to(q.dtype)
        out = proj.output(o)
        if n == b:  # every row attends to all its entries (its own included) and its band's live ones
            return out, kv.total + n_live, None
        read = r.readers[:, 0]
        pairs = int((kv.lengths * read).sum()) + n_live
        selection = (torch.zeros(b, 1, dtype=torch.long, device=out.device), r.readers)
        return out * r.readers[..., None].to(out.dtype), pairs, selection
