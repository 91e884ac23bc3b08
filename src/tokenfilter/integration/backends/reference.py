"""The reference backend: the definition. Every token computed, over every column, masked by the whole read rule
(``Visibility.allowed``); the stored entries are every column with a validity mask (``MaskedKV``)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from tokenfilter.algorithm.visibility import Visibility
from tokenfilter.integration.backends.base import Projections, QuerySelection, Reading
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
        allowed = vis.allowed(q_col, r.idx, k_col, k_idx, k_real, k_stored)
        pairs = (allowed & r.readers[:, :, None]).sum()
        computed = r.readers
        if r.pads is not None:  # they read the stored entries in their past, as the model's own queries would
            pad_allowed = vis.in_window(q_col[:, :, None], k_col[:, None, :]) & k_stored[:, None, :]
            allowed = torch.where(r.pads[:, :, None], pad_allowed, allowed)
            computed = computed | r.pads
        allowed = allowed | ~allowed.any(-1, keepdim=True)  # rows of padding queries: any finite output
        o = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=allowed[:, None], scale=proj.scale, enable_gqa=q.shape[1] != keys.shape[1]
        )
        o = proj.output(units.outputs(o))
        return o * units.any_unit(computed)[..., None].to(o.dtype), pairs, None
