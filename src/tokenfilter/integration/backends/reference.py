"""The reference backend: the definition. Every token computed, over every column, masked by the whole read rule
(``Visibility.allowed``); the stored entries are every column with a validity mask (``MaskedKV``). Under a KV budget
the rule reads every column's score, and the entries held (``Visibility.held``) are counted, not removed."""

from __future__ import annotations

from typing import ClassVar

import torch

from tokenfilter.algorithm.visibility import Visibility
from tokenfilter.integration.backends.base import Projections, QuerySelection, Reading
from tokenfilter.integration.backends.kernels import attend_masked
from tokenfilter.integration.kv_store import MaskedKV
from tokenfilter.integration.units import Units


class ReferenceBackend:
    name: ClassVar[str] = "reference"
    lean: ClassVar[bool] = False
    ring_values: ClassVar[bool] = False

    def supports(self, units: Units, vis: Visibility) -> str | None:
        return None

    def new_kv(self) -> MaskedKV:
        return MaskedKV()

    def attend(
        self, r: Reading, proj: Projections, vis: Visibility, units: Units, kv: MaskedKV
    ) -> tuple[torch.Tensor, torch.Tensor, QuerySelection]:
        b, t, _ = r.h.shape
        q = units.queries(proj.queries(r.h, r.cos, r.sin))  # [rows, Hq / per, T, d]
        keys, values, k_col, k_stored, k_real, k_idx = kv.view_all()
        q_col = r.cols.expand(r.readers.shape[0], t)
        budget = vis.slots is not None
        allowed = vis.allowed(q_col, r.idx, k_col, k_idx, k_real, k_stored, kv.scores)
        pairs = (allowed & r.readers[:, :, None]).sum()
        computed = r.readers
        if budget:
            self._count_held(vis, kv, k_idx, k_real, int(r.readers.sum()))
        if r.pads is not None:  # they read the stored entries in their past, as the model's own queries would
            # (under a budget: what the row's next token would find held)
            past = vis.held_at(r.idx + 1, k_idx, kv.scores, k_real) if budget else k_stored[:, None, :]
            pad_allowed = vis.in_window(q_col[:, :, None], k_col[:, None, :]) & past
            allowed = torch.where(r.pads[:, :, None], pad_allowed, allowed)
            computed = computed | r.pads
        o = proj.output(units.outputs(attend_masked(q, keys, values, allowed, proj.scale)))
        return o * units.any_unit(computed)[..., None].to(o.dtype), pairs, None

    @staticmethod
    def _count_held(vis: Visibility, kv: MaskedKV, k_idx: torch.Tensor, k_real: torch.Tensor, arrived: int) -> None:
        """Under a budget: count the entries each row holds for its next token, and those that left in this call."""
        held = vis.held(k_real.sum(-1), k_idx, kv.scores, k_real).sum(-1)  # [B]; idx counts real tokens
        total = int(held.sum())
        kv.evicted += kv.held_total + arrived - total
        kv.held_total = total
        kv.peak_held = max(kv.peak_held or 0, int(held.max()))
