"""What every score receives besides the keys and values (``ScoreState``), and how a score is registered (``Score``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ScoreState:
    """What a score may read, and keep between calls, for one filtered layer and one call.

    The call's real tokens are left-aligned: row b's first ``counts[b]`` entries are its real tokens in order.

    Attributes:
        valid: ``[B, N]`` bool, True on real entries; None when every entry is real (no padding in the call).
        seen: ``[B]`` long, real tokens of each row before this call; None for a decode step (``StepFn``), which is
            only called once every row is past its first token and reads no counts.
        memory: the layer's running tensors (each ``[B, ...]``, float32), kept in its cache between calls and
            reordered with it (beam search); a score owns its keys in it (e.g. ``"anchors"``).
        generator: a seeded CPU generator, for scores that draw.
        params: the score's own parameters (the ``TokenFilter`` fields its ``Score.params`` names), by name.
    """

    valid: torch.Tensor | None
    seen: torch.Tensor | None
    memory: dict[str, torch.Tensor]
    generator: torch.Generator | None = None
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def counts(self) -> torch.Tensor | None:
        """``[B]`` real entries per row in this call (None when every entry is real)."""
        return None if self.valid is None else self.valid.sum(-1)

    def last(self, per_token: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        """Each row's value after its last real entry: ``per_token[b, counts[b] - 1]`` (``[B, N, ...]`` ->
        ``[B, ...]``), or ``before[b]`` for a row with no real entry in this call."""
        if self.valid is None:
            return per_token[:, -1].clone()  # a copy: a view would keep all of `per_token` alive
        counts = self.counts
        rows = torch.arange(per_token.shape[0], device=per_token.device)
        picked = per_token[rows, (counts - 1).clamp(min=0)]
        has_new = (counts > 0).view(-1, *([1] * (picked.dim() - 1)))
        return torch.where(has_new, picked, before)


ScoreFn = Callable[[torch.Tensor, torch.Tensor, ScoreState], torch.Tensor]
"""``(keys [B, N, H, d], values [B, N, H, d], state) -> scores [B, N]`` float32; higher = more redundant (filtered
first). Entries past a row's real tokens may hold anything: the engine ignores them."""

StepFn = Callable[[torch.Tensor, torch.Tensor, ScoreState], "torch.Tensor | None"]
"""A decode step: ``(k [B, 1, H, d], v, state) -> [B] | None`` for one real token per row, every row past its first
token (``state.valid`` and ``state.seen`` None). Must equal the ``ScoreFn`` bit for bit; None (nothing done, memory
untouched) hands the token to the ``ScoreFn``."""


@dataclass(frozen=True)
class Score:
    """A registered score: its function, its optional one-token decode step, and the parameters it reads.

    ``params`` names the ``TokenFilter`` fields passed in ``ScoreState.params`` (e.g. ``("gamma", "fusion")``): a
    new parameter is a field there and a name here, nothing else. Calling a ``Score`` calls its function.
    """

    fn: ScoreFn
    step: StepFn | None = None
    params: tuple[str, ...] = ()

    def __call__(self, keys: torch.Tensor, values: torch.Tensor, state: ScoreState) -> torch.Tensor:
        return self.fn(keys, values, state)
