"""What one decision is about (``granularity``): a token with all its KV heads, or one KV head of a token.

Per-KV-head decisions (``granularity="head"``, SPEC "KV-side filtering") are per-token decisions on a batch whose
rows are (sequence, KV head) pairs holding one head each: row ``b * H + h`` is head h of sequence b. Folded that
way, the scores, anchors, decisions, history, cache and visibility rule need no code of their own; only the
queries (the ``G = Hq / H`` query heads that read KV head h go with its row) and the attention output are
reshaped. The ratio, pairs and dropped entries are then counted in (token, head) units.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Units:
    """``per``: decision units per token (rows per sequence): 1 (``granularity="token"``), or H, the KV heads."""

    per: int = 1

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """A per-sequence tensor ``[B, ...]`` -> per row ``[B * per, ...]`` (each sequence's value repeated)."""
        return x if self.per == 1 else x.repeat_interleave(self.per, 0)

    def kv(self, x: torch.Tensor) -> torch.Tensor:
        """Keys or values ``[B, T, H, d]`` -> ``[B * per, T, H / per, d]``."""
        if self.per == 1:
            return x
        b, t, h, d = x.shape
        return x.transpose(1, 2).reshape(b * h, t, 1, d)

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        """Queries ``[B, Hq, T, d]`` -> ``[B * per, Hq / per, T, d]``: query head i reads KV head ``i // G``."""
        b, hq, t, d = q.shape
        return q if self.per == 1 else q.reshape(b * self.per, hq // self.per, t, d)

    def outputs(self, o: torch.Tensor) -> torch.Tensor:
        """The inverse of ``queries``: ``[B * per, Hq / per, T, d]`` -> ``[B, Hq, T, d]``."""
        n, g, t, d = o.shape
        return o if self.per == 1 else o.reshape(n // self.per, g * self.per, t, d)

    def per_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """Per row ``[B * per, T]`` -> ``[B, T]`` (per token) or ``[B, H, T]`` (per head): recorded decisions."""
        return x if self.per == 1 else x.view(-1, self.per, *x.shape[1:])

    def any_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Per row ``[B * per, T]`` bool -> ``[B, T]``: True where any unit of the token is True."""
        return x if self.per == 1 else x.view(-1, self.per, *x.shape[1:]).any(1)

    def select(self, index: torch.Tensor) -> torch.Tensor:
        """Sequence indices ``[N]`` (beam search, ``batch_select_indices``) -> the row indices ``[N * per]``."""
        if self.per == 1:
            return index
        return (index[:, None] * self.per + torch.arange(self.per, device=index.device)).reshape(-1)
