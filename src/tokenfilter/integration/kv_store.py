"""Key/value storage of one filtered layer for one batch of sequences.

Two layouts, same interface, so the attention code does not care which one it reads:

* ``RaggedKV`` (fast path): each sequence keeps only its stored entries, left-aligned in a
  ``[B, H_kv, capacity, d]`` buffer with per-sequence ``lengths`` (the varlen idea in a padded tensor).
  Appends write in place; the buffer grows by doubling, so decoding does not reallocate every step.
* ``MaskedKV`` (reference path): every column is stored, plus a ``[B, S]`` validity mask.
"""

from __future__ import annotations

import torch


class RaggedKV:
    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None  # [B, H, cap, d]
        self.values: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None  # [B, cap] column index of each entry
        self.lengths: torch.Tensor | None = None  # [B]

    def append(self, k: torch.Tensor, v: torch.Tensor, cols: torch.Tensor, store: torch.Tensor) -> None:
        """``k, v``: ``[B, H, T, d]``; ``cols``: ``[T]``; ``store``: ``[B, T]`` bool (entries to keep)."""
        b, h, _, d = k.shape
        if self.keys is None:
            self.keys = k.new_empty(b, h, 0, d)
            self.values = v.new_empty(b, h, 0, d)
            self.pos = torch.empty(b, 0, dtype=torch.long, device=k.device)
            self.lengths = torch.zeros(b, dtype=torch.long, device=k.device)
        dest = self.lengths[:, None] + store.long().cumsum(-1) - 1  # [B, T]
        new_lengths = self.lengths + store.sum(-1)
        need = int(new_lengths.max())
        cap = self.keys.shape[2]
        if need > cap:
            new_cap = max(need, 2 * cap, 16)
            grow = new_cap - cap
            self.keys = torch.cat([self.keys, self.keys.new_zeros(b, h, grow, d)], dim=2)
            self.values = torch.cat([self.values, self.values.new_zeros(b, h, grow, d)], dim=2)
            self.pos = torch.cat([self.pos, self.pos.new_zeros(b, grow)], dim=1)
        bi, ti = store.nonzero(as_tuple=True)
        di = dest[bi, ti]
        self.keys[bi, :, di] = k[bi, :, ti]
        self.values[bi, :, di] = v[bi, :, ti]
        self.pos[bi, di] = cols[ti]
        self.lengths = new_lengths

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(keys [B,H,L,d], values, pos [B,L], valid [B,L])`` with L the longest sequence's length."""
        n = int(self.lengths.max()) if self.lengths.numel() else 0
        valid = torch.arange(n, device=self.pos.device)[None, :] < self.lengths[:, None]
        return self.keys[:, :, :n], self.values[:, :, :n], self.pos[:, :n], valid

    def stored_entries(self) -> int:
        return int(self.lengths.sum()) if self.lengths is not None else 0

    def allocated_bytes(self) -> int:
        if self.keys is None:
            return 0
        return (self.keys.numel() + self.values.numel()) * self.keys.element_size()

    def select_batch(self, index: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys[index], self.values[index]
            self.pos, self.lengths = self.pos[index], self.lengths[index]


class MaskedKV:
    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None  # [B, H, S, d]
        self.values: torch.Tensor | None = None
        self.cols: torch.Tensor | None = None  # [S]
        self.valid: torch.Tensor | None = None  # [B, S]

    def append(self, k: torch.Tensor, v: torch.Tensor, cols: torch.Tensor, store: torch.Tensor) -> None:
        if self.keys is None:
            self.keys, self.values, self.cols, self.valid = k, v, cols, store
            return
        self.keys = torch.cat([self.keys, k], dim=2)
        self.values = torch.cat([self.values, v], dim=2)
        self.cols = torch.cat([self.cols, cols])
        self.valid = torch.cat([self.valid, store], dim=1)

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.keys, self.values, self.cols[None, :].expand_as(self.valid), self.valid

    def stored_entries(self) -> int:
        return int(self.valid.sum()) if self.valid is not None else 0

    def allocated_bytes(self) -> int:
        if self.keys is None:
            return 0
        return (self.keys.numel() + self.values.numel()) * self.keys.element_size()

    def select_batch(self, index: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys, self.values, self.valid = self.keys[index], self.values[index], self.valid[index]
