"""``FilteredMLP``: the replacement MLP forward for ``skip="block"``: a token that skips its attention skips the
MLP too (zero output, so the residual passes). It reads what the layer's attention left in the call context."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from tokenfilter.integration.backends.kernels import gather_rows, scatter_rows

if TYPE_CHECKING:
    from tokenfilter.integration.run import FilterRun


class FilteredMLP:
    def __init__(self, run: FilterRun, layer_idx: int, mlp: nn.Module) -> None:
        self.run, self.idx, self.mlp = run, layer_idx, mlp
        self.original = type(mlp).forward

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, T, D]``. Only the reading tokens run the MLP where the attention gathered them."""
        readers, selection = self.run.call.keep[self.idx]  # [B, T] bool, the backend's QuerySelection
        if selection is None:  # the backend computed every token
            return self.original(self.mlp, x) * readers[..., None].to(x.dtype)
        sel, valid = selection
        return scatter_rows(self.original(self.mlp, gather_rows(x, sel)), sel, valid, x.shape[1])
