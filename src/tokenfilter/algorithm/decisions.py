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
    spare host syncs: equal bounds mean every row holds as many scores. ``filtered`` and ``seen`` count each row's
    filtered and real tokens so far (the decode controller's realized ratio), kept as Python numbers: the controller
    is a few scalar operations per row, which cost less on the host than as tensor operators."""

    def __init__(self, batch: int, device: torch.device) -> None:
        self.values = torch.empty(batch, 0, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.longest = 0
        self.shortest = 0
        self.filtered_rows = [0] * batch  # whole numbers: the controller's excess is computed without rounding
        self.seen_rows = [0] * batch

    @property
    def filtered(self) -> torch.Tensor:
        """``[B]`` float64: each row's filtered tokens so far."""
        return torch.tensor(self.filtered_rows, dtype=torch.float64, device=self.values.device)

    @property
    def seen(self) -> torch.Tensor:
        """``[B]`` float64: each row's real tokens so far."""
        return torch.tensor(self.seen_rows, dtype=torch.float64, device=self.values.device)

    def count(self, filtered: torch.Tensor, real: torch.Tensor | None) -> None:
        """Count a call's filtered and real tokens per row (``[B, T]`` bool each; ``real`` None: one real token per
        row). One host sync."""
        if real is None:
            got = filtered.view(-1).tolist()
            self.seen_rows = [s + 1 for s in self.seen_rows]
        else:
            got, n_real = torch.stack([filtered.sum(-1), real.sum(-1)]).tolist()
            self.seen_rows = [s + n for s, n in zip(self.seen_rows, n_real, strict=True)]
        self.filtered_rows = [f + int(n) for f, n in zip(self.filtered_rows, got, strict=True)]

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
        """Insert one score ``[B]`` into every row: a binary search and a shift, no sort (and no host sync, but for
        one row on the CPU, where a sync is free and the shift in place is cheaper than three passes over the row)."""
        width = self.longest + 1
        self._reserve(width)
        h = self.values[:, :width]  # column width - 1 is +inf in every row (longest bounds the lengths)
        s = scores.float()[:, None]
        at = torch.searchsorted(self.values, s)  # [B, 1]; the whole (contiguous) rows: the tail is +inf
        if h.shape[0] == 1 and h.device.type == "cpu":  # one row on the host: shift the tail by one, in place
            i = int(at)
            if i < width - 1:
                h[0, i + 1 :] = h[0, i:-1].clone()
            h[0, i] = s[0, 0]
            self._grew_by_one()
            return
        col = torch.arange(width, device=h.device)
        self.values[:, :width] = torch.where(col < at, h, torch.where(col == at, s, h.roll(1, -1)))
        self._grew_by_one()

    def _grew_by_one(self) -> None:
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
        rows = index.tolist()
        self.filtered_rows = [self.filtered_rows[i] for i in rows]
        self.seen_rows = [self.seen_rows[i] for i in rows]

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
        history.count(filtered, None if eligible is None else real)
        return filtered

    def controlled(self, scores: torch.Tensor, eligible: torch.Tensor | None, history: ScoreHistory) -> torch.Tensor:
        """Decode step (one token per row, ``[B, 1]``): with ``excess = filtered - ratio * seen`` the row's filtered
        tokens beyond its target so far, filter a token above the row's running quantile at level
        ``1 - clamp(ratio - excess / CONTROL_HORIZON, 0, 1)``; then keep it if filtering would take the excess above
        ``CONTROL_ABOVE``, and filter it (when eligible) if keeping it would take the excess below
        ``-CONTROL_BELOW``. With no excess the level is the SPEC's ``1 - ratio``."""
        r = self.target
        # per row, in Python floats (float64): the excess before this token and the quantile's level
        excess = [f - r * s for f, s in zip(history.filtered_rows, history.seen_rows, strict=True)]
        levels = [1 - min(max(r - e / CONTROL_HORIZON, 0.0), 1.0) for e in excess]
        one = all(lv == levels[0] for lv in levels)
        level = levels[0] if one else torch.tensor(levels, dtype=torch.float64, device=scores.device)
        filtered = above(scores, eligible, history.quantile(level))
        # the excess after this token: ``e - r`` if it is kept, one more if it is filtered
        allowed = [e - r + 1 <= CONTROL_ABOVE for e in excess]
        forced = [e - r < -CONTROL_BELOW for e in excess]
        if not all(allowed):
            filtered = filtered & torch.tensor(allowed, device=scores.device)[:, None]
        if any(forced):
            force = torch.tensor(forced, device=scores.device)[:, None]
            filtered = filtered | (force if eligible is None else force & eligible)
        return filtered
