"""Turning scores into decisions (True = filtered); higher score = more redundant.

Two rules (``Rule``), each written once here for prefill and decode:

* threshold: filter the eligible tokens whose score is strictly above the layer's ``tau``;
* ratio: in prefill, per row, the ``round(ratio * n_real)`` eligible highest scores (``top_ratio``); in decode,
  a token above its row's running quantile of the scores seen so far, at a level a controller sets from the
  row's realized ratio so far (``Rule.decide``). The quantile and the counts are read from ``ScoreHistory``, each
  row's eligible scores kept sorted and its filtered / real tokens counted (it lives in the layer's cache, with
  the sequence).

Why a controller: the SPEC's decode rule is the running quantile at level ``1 - ratio`` alone. Generated text
scores higher than the prompt it follows (its keys repeat the recent past), so that quantile lags and the realized
ratio overshoots (0.66 at ratio 0.5 over SmolLM2-135M's own greedy output). The controller keeps the quantile as
the ranking of a token against the row's past and moves only its level, by the row's excess of filtered tokens
(``CONTROL_HORIZON``), and never lets that excess leave ``[-CONTROL_BELOW, CONTROL_ABOVE]`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

CONTROL_HORIZON = 32.0  # decode aims to pay back a row's excess of filtered tokens over this many tokens
# a row's excess (filtered - ratio * real tokens) stays within [-CONTROL_BELOW, CONTROL_ABOVE]: above, a token
# the score would filter is kept (costs nothing in quality, and bounds the overshoot of a short generation); below,
# an eligible token is filtered whatever its score (rare: the quantile alone undershoots little)
CONTROL_ABOVE = 2.0
CONTROL_BELOW = 8.0


def top_ratio(scores: torch.Tensor, eligible: torch.Tensor, n_real: torch.Tensor, ratio: float) -> torch.Tensor:
    """Prefill rule: per row, filter the ``min(n_eligible, round(ratio * n_real))`` eligible highest scores.

    ``scores, eligible``: ``[B, T]``; ``n_real``: ``[B]``. Returns ``[B, T]`` bool.
    """
    k = torch.minimum(eligible.sum(-1), torch.round(ratio * n_real.float()).long())
    masked = scores.float().masked_fill(~eligible, float("-inf"))
    order = masked.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return (rank < k[:, None]) & eligible


def above(scores: torch.Tensor, eligible: torch.Tensor | None, tau: torch.Tensor | float) -> torch.Tensor:
    """Threshold rule: filter eligible tokens whose score is strictly above ``tau`` (scalar or ``[B, 1]``);
    ``eligible`` None: every token is."""
    return scores > tau if eligible is None else eligible & (scores > tau)


class ScoreHistory:
    """Each row's eligible scores so far, sorted, ``+inf``-padded (``values`` ``[B, N]``, ``lengths`` ``[B]``), so
    that the decode rule reads a quantile without sorting. Python bounds of the lengths (``longest``, ``shortest``)
    spare host syncs: equal bounds mean every row holds as many scores. ``filtered`` and ``seen`` ``[B]`` count each
    row's filtered and real tokens so far (the decode controller's realized ratio)."""

    def __init__(self, batch: int, device: torch.device) -> None:
        self.values = torch.empty(batch, 0, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.longest = 0
        self.shortest = 0
        # float64: the controller's excess (filtered - ratio * seen) is compared with its bounds without rounding
        self.filtered = torch.zeros(batch, dtype=torch.float64, device=device)
        self.seen = torch.zeros(batch, dtype=torch.float64, device=device)

    def count(self, filtered: torch.Tensor, real: torch.Tensor) -> None:
        """Count a call's filtered and real tokens per row (``[B, T]`` bool each)."""
        self.filtered = self.filtered + filtered.sum(-1)
        self.seen = self.seen + real.sum(-1)

    def add(self, scores: torch.Tensor, eligible: torch.Tensor | None) -> None:
        """Add each row's eligible scores ``[B, T]`` (``eligible`` None: one token per row, every one eligible)."""
        if eligible is None:
            return self._add_one(scores[:, 0])
        new_len = self.lengths + eligible.sum(-1)
        longest, shortest = torch.stack([new_len.max(), new_len.min()]).tolist()
        self._reserve(longest)
        bi, ti = eligible.nonzero(as_tuple=True)
        dest = (self.lengths[:, None] + eligible.long().cumsum(-1) - 1)[bi, ti]
        self.values[bi, dest] = scores[bi, ti].float()
        self.values[:, :longest] = self.values[:, :longest].sort(-1).values  # the +inf padding stays last
        self.lengths = new_len
        self.longest, self.shortest = longest, shortest

    def _add_one(self, scores: torch.Tensor) -> None:
        """Insert one score ``[B]`` into every row: a binary search and a shift, no sort and no host sync."""
        width = self.longest + 1
        self._reserve(width)
        h = self.values[:, :width]  # column width - 1 is +inf in every row (longest bounds the lengths)
        s = scores.float()[:, None]
        at = torch.searchsorted(self.values, s)  # [B, 1]; the whole (contiguous) rows: the tail is +inf
        col = torch.arange(width, device=h.device)
        self.values[:, :width] = torch.where(col < at, h, torch.where(col == at, s, h.roll(1, -1)))
        self.lengths = self.lengths + 1
        self.longest += 1
        self.shortest += 1

    def quantile(self, level: float | torch.Tensor) -> torch.Tensor:
        """Per-row quantile ``[B, 1]`` at ``level`` (one number, or one per row ``[B]``; NaN for an empty row), with
        the linear interpolation and float32 rank arithmetic of ``torch.nanquantile``."""
        b = self.values.shape[0]
        if self.longest == 0:
            return torch.full((b, 1), float("nan"), device=self.values.device)
        if not isinstance(level, torch.Tensor) and self.shortest == self.longest:  # the ranks are known here
            rank = np.float32(level) * np.float32(self.longest - 1)
            lo, hi = int(np.floor(rank)), int(np.ceil(rank))
            weight = float(rank - np.float32(lo))
            return torch.lerp(self.values[:, lo : lo + 1], self.values[:, hi : hi + 1], weight)
        level = torch.as_tensor(level, dtype=torch.float32, device=self.values.device)
        rank = level * (self.lengths - 1).clamp(min=0).float()
        lo, hi = rank.floor(), rank.ceil()
        ends = self.values.gather(1, torch.stack([lo, hi], dim=1).long())  # [B, 2]
        q = torch.lerp(ends[:, :1], ends[:, 1:], (rank - lo)[:, None])
        return q.masked_fill((self.lengths == 0)[:, None], float("nan"))

    def select(self, index: torch.Tensor) -> None:
        """Keep (or reorder, repeat) the rows ``index`` ``[N]`` (the Python bounds stay bounds of a subset)."""
        self.values, self.lengths = self.values[index], self.lengths[index]
        self.filtered, self.seen = self.filtered[index], self.seen[index]

    def _reserve(self, need: int) -> None:
        if need > self.values.shape[1]:
            grow = max(need, 2 * self.values.shape[1], 64) - self.values.shape[1]
            pad = torch.full((self.values.shape[0], grow), float("inf"), device=self.values.device)
            self.values = torch.cat([self.values, pad], dim=1)


@dataclass(frozen=True)
class Rule:
    """One layer's decision rule: ``mode`` ``"ratio"`` (``target`` is the layer's ratio), ``"threshold"``
    (``target`` is its tau) or ``"budget"`` (``target`` is the entries held; nothing is decided on arrival: the layer's
    store evicts, ``Visibility.held``)."""

    mode: Literal["ratio", "threshold", "budget"]
    target: float

    def decide(
        self,
        scores: torch.Tensor,
        eligible: torch.Tensor | None,
        real: torch.Tensor,
        history: ScoreHistory,
        decoding: bool,
    ) -> torch.Tensor:
        """``scores`` ``[B, T]`` (NaN on padding), ``eligible`` ``[B, T]`` (None: every token, one per row),
        ``real`` ``[B, T]`` -> filtered ``[B, T]`` bool; the ratio rule adds the eligible scores and the counts to
        ``history``."""
        if self.mode == "threshold":
            return above(scores, eligible, self.target)
        if self.mode == "budget":
            return torch.zeros_like(real)
        if decoding:
            filtered = self.controlled(scores, eligible, history)
        else:
            filtered = top_ratio(scores, eligible, real.sum(-1), self.target)
        history.add(scores, eligible)
        history.count(filtered, real)
        return filtered

    def controlled(self, scores: torch.Tensor, eligible: torch.Tensor | None, history: ScoreHistory) -> torch.Tensor:
        """Decode step (one token per row, ``[B, 1]``): with ``excess = filtered - ratio * seen`` the row's filtered
        tokens beyond its target so far, filter a token above the row's running quantile at level
        ``1 - clamp(ratio - excess / CONTROL_HORIZON, 0, 1)``; then keep it if filtering would take the excess above
        ``CONTROL_ABOVE``, and filter it (when eligible) if keeping it would take the excess below
        ``-CONTROL_BELOW``. With no excess the level is the SPEC's ``1 - ratio``."""
        r = self.target
        excess = history.filtered - r * history.seen  # [B], before this token
        level = 1 - (r - excess / CONTROL_HORIZON).clamp(0, 1)
        filtered = above(scores, eligible, history.quantile(level))
        kept_excess = (excess - r)[:, None]  # the excess after this token, if it is kept
        filtered = filtered & (kept_excess + 1 <= CONTROL_ABOVE)  # the excess if it is filtered
        forced = kept_excess < -CONTROL_BELOW
        return filtered | (forced if eligible is None else forced & eligible)
