"""The protocol every attention backend implements, and what one call hands it (``Reading``).

A backend computes one filtered layer's attention for one call, after the layer path (``integration/attention.py``)
has scored, decided, and written the call's stored entries and recent band. It owns the layout of the stored
entries (``new_kv``) and says which layers it can run (``supports``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from tokenfilter.algorithm.visibility import Visibility
from tokenfilter.integration.backends.kernels import attend, compact_order, gather_rows, scatter_rows
from tokenfilter.integration.kv_store import MaskedKV, RaggedKV
from tokenfilter.integration.units import Units


class Projections(Protocol):
    """The layer's own projections, as a backend calls them."""

    scale: float

    def queries(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``h``: ``[B, Q, D]`` -> queries with RoPE ``[B, Hq, Q, d]``."""
        ...

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """Attention output ``[B, Hq, Q, d]`` -> ``[B, Q, D]`` (the O projection)."""
        ...


@dataclass
class Reading:
    """One call of one layer, as the attention reads it. ``h, cos, sin`` are per sequence (``[B, T, D]``,
    ``[B, T, d]``); ``readers, stored, idx`` per row (``Units``), ``[rows, T]``; ``cols``: ``[T]`` columns.

    ``band``: the recent band's sources (``RecentRing.extend``), or None without a band. ``fresh``: the store was
    empty before this call. ``lean``: a decode step with one real token per row, past warm-up, every stored entry
    in the past and in the model's window; ``n_readers`` (Python) is then how many rows read. ``cols`` and ``idx``
    are None on a lean step without a band (the lean branch reads neither).

    ``pads`` ``[rows, T]`` (None when there is none): padding columns after a real token of their row (right
    padding). The unmodified model computes their attention over the real tokens before them, and ``generate``
    reads a right-padded row's next token from its last column, so a backend computes them as the model's own
    queries would, over the stored entries in their past (no band; not counted in the statistics). ``aligned``: each
    row's real tokens are its first columns (no padding, or right padding only: ``pads`` then trail them)."""

    h: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    readers: torch.Tensor
    stored: torch.Tensor
    cols: torch.Tensor | None
    idx: torch.Tensor | None
    band: tuple[torch.Tensor, ...] | None
    fresh: bool
    lean: bool = False
    n_readers: int = 0
    pads: torch.Tensor | None = None
    band_live: int = 0  # entries only the band reads among its sources (Python: no host sync to ask)
    aligned: bool = False
    all_read: bool = False  # every column of every row is a real token that reads (``readers`` all True)


def attend_pads(
    r: Reading, proj: Projections, vis: Visibility, keys: torch.Tensor, values: torch.Tensor, k_pos: torch.Tensor,
    k_valid: torch.Tensor,
) -> torch.Tensor:
    """The output ``[B, T, D]`` of the padding columns ``r.pads`` (0 elsewhere), each over the given entries
    (``keys, values`` ``[B, H, K, d]``, ``k_pos, k_valid`` ``[B, K]``) in its past and in the model's window: what
    the row's next token would read. Each backend passes the entries its layout holds."""
    sel, valid, _ = compact_order(r.pads)
    q = proj.queries(gather_rows(r.h, sel), gather_rows(r.cos, sel), gather_rows(r.sin, sel))
    o, _ = attend(q, r.cols[sel], valid, keys, values, k_pos, k_valid, proj.scale, vis)
    return scatter_rows(proj.output(o), sel, valid, r.h.shape[1])


QuerySelection = tuple[torch.Tensor, torch.Tensor] | None
"""``(sel [B, N], valid [B, N])``: the computed tokens (readers and ``pads``) gathered to the front of each row (what
``skip="block"``'s MLP reuses), or None when the backend computed every token."""


class AttentionBackend(Protocol):
    """``attend`` returns ``(out [B, T, D], pairs, selection)``: the layer's output (0 for a token that does not
    read), the (query, key) pairs attended (int or 0-d tensor), and the ``QuerySelection``."""

    name: ClassVar[str]
    lean: ClassVar[bool]  # takes the one-token decode branch of the layer path (``Reading.lean``)
    ring_values: ClassVar[bool]  # its recent ring keeps keys and values (else flags only, the keys being stored)

    def supports(self, units: Units, vis: Visibility) -> str | None:
        """None, or one sentence saying what it cannot run."""
        ...

    def new_kv(self) -> RaggedKV | MaskedKV: ...

    def attend(
        self, r: Reading, proj: Projections, vis: Visibility, units: Units, kv: RaggedKV | MaskedKV
    ) -> tuple[torch.Tensor, torch.Tensor | int, QuerySelection]: ...
