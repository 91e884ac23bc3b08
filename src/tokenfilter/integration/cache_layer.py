"""``FilteredCacheLayer``: a transformers cache layer for one filtered decoder layer.

It sits in ``DynamicCache.layers[l]`` in place of a ``DynamicLayer`` and holds everything the filter
needs per sequence, so the state lives exactly as long as the cache (one ``generate`` call, or one
user-managed cache): the stored keys/values (only the kept tokens with ``kv="drop"``), on the KV side the
ring of the latest real tokens the recent band still reads, the anchors, the
number of real tokens seen (for warm-up) and the history of scores (for the decode-time quantile).

To the rest of transformers it reports the number of *columns* processed, as a ``DynamicLayer`` would,
so positions and masks built for the unfiltered layers stay right.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.cache_utils import CacheLayerMixin

from tokenfilter.integration.kv_store import MaskedKV, RaggedKV, RecentRing
from tokenfilter.integration.units import Units


class FilteredCacheLayer(CacheLayerMixin):
    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, ragged: bool = True, ring: int | None = None, units: Units | None = None) -> None:
        super().__init__()
        # its rows: one per sequence, or one per (sequence, KV head) with per-head decisions; every tensor below
        # is per row
        self.units = units or Units()
        self.kv = RaggedKV() if ragged else MaskedKV()
        # KV side: the last ``ring`` real tokens, for the recent band (with their values on the fast path only)
        self.ring = None if ring is None else RecentRing(ring, with_values=ragged)
        self.columns = 0  # columns (real or padding) processed so far
        self.score_memory: dict[str, torch.Tensor] = {}  # the score's running tensors, [B, ...] each
        self.real_seen: torch.Tensor | None = None  # [B] real tokens seen
        self.history: torch.Tensor | None = None  # [B, N] each row's eligible scores so far, sorted, +inf-padded
        self.history_len: torch.Tensor | None = None  # [B]
        self.min_real_seen = 0  # Python lower bound of real_seen.min() (decides the decode fast path)
        self.history_max = 0  # Python upper bound of history_len.max()
        self.history_min = 0  # Python lower bound of history_len.min() (equal bounds: every row has as many)
        self.is_initialized = True

    @property
    def anchors(self) -> torch.Tensor | None:
        """``[B, 2, H_kv, d]`` float32: the similarity score's key anchor, then its value one (None before)."""
        return self.score_memory.get("anchors")

    @property
    def anchor_k(self) -> torch.Tensor | None:
        return None if self.anchors is None else self.anchors[:, 0]

    @property
    def anchor_v(self) -> torch.Tensor | None:
        return None if self.anchors is None else self.anchors[:, 1]

    # -- state used by the filter -------------------------------------------------------------
    def init_state(self, batch: int, heads: int, head_dim: int, device: torch.device) -> None:
        if self.real_seen is None:
            self.real_seen = torch.zeros(batch, dtype=torch.long, device=device)
            self.history = torch.empty(batch, 0, device=device)
            self.history_len = torch.zeros(batch, dtype=torch.long, device=device)
        elif self.real_seen.shape[0] != batch:
            per = self.units.per
            raise ValueError(
                f"The cache holds {self.real_seen.shape[0] // per} sequences but this call has {batch // per}; "
                "use a new cache for a new batch."
            )

    def add_history(self, scores: torch.Tensor, eligible: torch.Tensor) -> None:
        """Add each row's eligible scores ``[B, T]`` to its history (kept sorted, ``+inf`` beyond)."""
        new_len = self.history_len + eligible.sum(-1)
        longest, shortest = torch.stack([new_len.max(), new_len.min()]).tolist()
        self._reserve_history(longest)
        bi, ti = eligible.nonzero(as_tuple=True)
        dest = (self.history_len[:, None] + eligible.long().cumsum(-1) - 1)[bi, ti]
        self.history[bi, dest] = scores[bi, ti].float()
        self.history[:, :longest] = self.history[:, :longest].sort(-1).values  # the +inf padding stays last
        self.history_len = new_len
        self.history_max, self.history_min = longest, shortest

    def add_history_one(self, scores: torch.Tensor) -> None:
        """Insert one score ``[B]`` into every row's sorted history (a decode step where every row's token is
        eligible): a binary search and a shift, no sort and no host sync."""
        width = self.history_max + 1
        self._reserve_history(width)
        h = self.history[:, :width]  # column width - 1 is +inf in every row (history_max bounds the lengths)
        s = scores.float()[:, None]
        at = torch.searchsorted(self.history, s)  # [B, 1]; the whole (contiguous) rows: the tail is +inf
        col = torch.arange(width, device=h.device)
        self.history[:, :width] = torch.where(col < at, h, torch.where(col == at, s, h.roll(1, -1)))
        self.history_len = self.history_len + 1
        self.history_max += 1
        self.history_min += 1

    def score_quantile(self, level: float) -> torch.Tensor:
        """Per-row quantile of the scores seen so far ``[B, 1]`` (NaN for an empty row), with the linear
        interpolation and float32 rank arithmetic of ``torch.nanquantile``, read from the sorted history."""
        b = self.history.shape[0]
        if self.history_max == 0:
            return torch.full((b, 1), float("nan"), device=self.history.device)
        if self.history_min == self.history_max:  # every row holds n scores: the ranks are known here
            rank = np.float32(level) * np.float32(self.history_max - 1)
            lo, hi = int(np.floor(rank)), int(np.ceil(rank))
            weight = float(rank - np.float32(lo))
            return torch.lerp(self.history[:, lo : lo + 1], self.history[:, hi : hi + 1], weight)
        rank = torch.tensor(level, dtype=torch.float32) * (self.history_len - 1).clamp(min=0).float()
        lo, hi = rank.floor(), rank.ceil()
        ends = self.history.gather(1, torch.stack([lo, hi], dim=1).long())  # [B, 2]
        q = torch.lerp(ends[:, :1], ends[:, 1:], (rank - lo)[:, None])
        return q.masked_fill((self.history_len == 0)[:, None], float("nan"))

    def _reserve_history(self, need: int) -> None:
        if need > self.history.shape[1]:
            grow = max(need, 2 * self.history.shape[1], 64) - self.history.shape[1]
            pad = torch.full((self.history.shape[0], grow), float("inf"), device=self.history.device)
            self.history = torch.cat([self.history, pad], dim=1)

    # -- the CacheLayerMixin interface ------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise RuntimeError("A filtered layer's cache is written by Token Filtering's attention, not by update().")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.columns + query_length, 0

    def get_seq_length(self) -> int:
        return self.columns

    def get_max_length(self) -> int:
        return -1

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass

    def reset(self) -> None:
        self.__init__(
            ragged=isinstance(self.kv, RaggedKV), ring=None if self.ring is None else self.ring.size, units=self.units
        )

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("Cropping a Token Filtering cache (assisted/speculative decoding) is not supported.")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep (or reorder, repeat) the sequences ``indices`` ``[N]``: their rows."""
        indices = self.units.select(indices)
        self.kv.select_batch(indices)
        if self.ring is not None:
            self.ring.select_batch(indices)
        for name in ("real_seen", "history", "history_len"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[indices.to(t.device)])
        self.score_memory = {k: t[indices.to(t.device)] for k, t in self.score_memory.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.real_seen is not None:
            n = self.real_seen.shape[0] // self.units.per
            self.batch_select_indices(torch.arange(n, device=self.real_seen.device).repeat_interleave(repeats))
