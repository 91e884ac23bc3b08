"""``FilteredCacheLayer``: a transformers cache layer for one filtered decoder layer.

It sits in ``DynamicCache.layers[l]`` in place of a ``DynamicLayer`` and holds everything the filter
needs per sequence, so the state lives exactly as long as the cache (one ``generate`` call, or one
user-managed cache): the stored keys/values (only the kept tokens with ``kv="drop"``; the layout is the attention
backend's), on the KV side the ring of the latest real tokens the recent band still reads, the score's running
tensors, the number of real tokens seen (for warm-up) and the history of scores (for the decode-time quantile).

To the rest of transformers it reports the number of *columns* processed, as a ``DynamicLayer`` would,
so positions and masks built for the unfiltered layers stay right.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers
from transformers.cache_utils import CacheLayerMixin

from tokenfilter.algorithm.decisions import ScoreHistory
from tokenfilter.integration.kv_store import MaskedKV, RaggedKV, RecentRing
from tokenfilter.integration.units import Units


class FilteredCacheLayer(CacheLayerMixin):
    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(
        self, new_kv: Callable[[], RaggedKV | MaskedKV] = RaggedKV, ring: RecentRing | None = None,
        units: Units | None = None,
    ) -> None:
        super().__init__()
        # its rows: one per sequence, or one per (sequence, KV head) with per-head decisions; every tensor below
        # is per row
        self.units = units or Units()
        self.new_kv = new_kv
        self.kv = new_kv()
        self.ring = ring  # KV side: the last real tokens, for the recent band
        self.columns = 0  # columns (real or padding) processed so far
        self.score_memory: dict[str, torch.Tensor] = {}  # the score's running tensors, [B, ...] each
        self._real_seen: torch.Tensor | None = None  # [B] real tokens seen, less ``_unsettled``
        self._unsettled = 0  # real tokens every row gained (decode steps) not yet added to ``_real_seen``
        self.history: ScoreHistory | None = None  # each row's eligible scores so far (the decode ratio rule)
        self.min_real_seen = 0  # Python lower bound of real_seen.min() (decides the decode fast path)
        self.is_initialized = True

    # -- state used by the filter -------------------------------------------------------------
    @property
    def real_seen(self) -> torch.Tensor | None:
        """``[B]`` real tokens each row has seen (None before the first call). Decode steps add theirs when this is
        next read (one operator for any number of steps): most steps never read it."""
        if self._unsettled:
            self._real_seen, self._unsettled = self._real_seen + self._unsettled, 0
        return self._real_seen

    @real_seen.setter
    def real_seen(self, value: torch.Tensor | None) -> None:
        self._real_seen, self._unsettled = value, 0

    def init_state(self, batch: int, device: torch.device) -> None:
        if self._real_seen is None:
            self.real_seen = torch.zeros(batch, dtype=torch.long, device=device)
            self.history = ScoreHistory(batch, device)
        elif self._real_seen.shape[0] != batch:  # (read as stored: the rows are known without settling)
            per = self.units.per
            raise ValueError(
                f"The cache holds {self._real_seen.shape[0] // per} sequences but this call has {batch // per}; "
                "use a new cache for a new batch."
            )

    def advance_real(self, counts: torch.Tensor | int, warmup: int) -> None:
        """Count this call's real tokens per row (``[B]``, or one int when every row gained as many: added when
        ``real_seen`` is next read)."""
        if isinstance(counts, int):
            self._unsettled += counts
            self.min_real_seen += counts
            return
        self.real_seen = self.real_seen + counts
        if self.min_real_seen < warmup:  # a lower bound; once past warm-up it needs no more syncs
            self.min_real_seen = int(self.real_seen.min())

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
        ring = None if self.ring is None else RecentRing(self.ring.size, self.ring.with_values)
        self.__init__(new_kv=self.new_kv, ring=ring, units=self.units)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("Cropping a Token Filtering cache (assisted/speculative decoding) is not supported.")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep (or reorder, repeat) the sequences ``indices`` ``[N]``: their rows."""
        indices = self.units.select(indices)
        self.kv.select_batch(indices)
        if self.ring is not None:
            self.ring.select_batch(indices)
        if self.real_seen is not None:
            self.real_seen = self.real_seen[indices.to(self.real_seen.device)]
            self.history.select(indices.to(self.real_seen.device))
        self.score_memory = {k: t[indices.to(t.device)] for k, t in self.score_memory.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.real_seen is not None:
            n = self.real_seen.shape[0] // self.units.per
            self.batch_select_indices(torch.arange(n, device=self.real_seen.device).repeat_interleave(repeats))


def layer_state(
    cache: object | None,
    index: int,
    transient: dict[int, FilteredCacheLayer],
    new_layer: Callable[[], FilteredCacheLayer],
    rows: int,
    device: torch.device,
    past: int,
) -> FilteredCacheLayer:
    """Layer ``index``'s state for a call of ``rows`` rows that continues after ``past`` columns: its
    ``FilteredCacheLayer`` in ``cache`` (put there on first use), or one for this call only without a cache
    (``use_cache=False``: kept in ``transient``)."""
    if cache is None:
        layer = transient.setdefault(index, new_layer())
    else:
        layers = cache.layers
        while len(layers) <= index:
            layers.append(cache.layer_class_to_replicate())
        layer = layers[index]
        if not isinstance(layer, FilteredCacheLayer):
            if layer.get_seq_length() > 0:
                raise ValueError(
                    "This cache was filled without Token Filtering; start from an empty cache inside the "
                    "`with TokenFilter(...).apply(model)` block."
                )
            layer = new_layer()
            layers[index] = layer
    layer.init_state(rows, device)
    if layer.columns != past:
        raise RuntimeError(
            f"Layer {index} holds the state of {layer.columns} earlier columns but this call continues after {past}: "
            f"the cache is not the one Token Filtering filled (transformers {transformers.__version__}); start from "
            "an empty cache inside the `with` block."
        )
    return layer
