"""Scores that ignore the content: the floors and limits a content score is compared against."""

from __future__ import annotations

import torch

from tokenfilter.algorithm.scores.state import ScoreState


def random(keys: torch.Tensor, values: torch.Tensor, state: ScoreState) -> torch.Tensor:
    """Uniform draws from the run's seeded generator ``[B, N]``: a random choice of the same number of tokens."""
    b, n = keys.shape[:2]
    return torch.rand(b, n, generator=state.generator).to(keys.device)


def constant(keys: torch.Tensor, values: torch.Tensor, state: ScoreState) -> torch.Tensor:
    """0 for every token ``[B, N]``: with a threshold below 0 every eligible token is filtered (the sliding-window
    preset); with a ratio, ties go to the earliest tokens."""
    return torch.zeros(keys.shape[:2], device=keys.device)
