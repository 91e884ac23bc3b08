"""Turning scores into decisions (True = filtered). Higher score = more redundant.

The decode rule's threshold (each row's running quantile of its past scores) is read from the sorted score
history the cache keeps: ``FilteredCacheLayer.score_quantile``.
"""

from __future__ import annotations

import torch


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


def above(scores: torch.Tensor, eligible: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """Threshold rule: filter eligible tokens whose score is strictly above ``tau`` (scalar or ``[B, 1]``)."""
    return eligible & (scores > tau)
