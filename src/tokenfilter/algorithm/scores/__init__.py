"""Scores as a registry (kvpress's shape): one small function per score, one signature, chosen by name.

Every score is a ``ScoreFn``: ``(keys [B, N, H, d], values [B, N, H, d], state: ScoreState) -> [B, N]``
float32, higher = more redundant (filtered first). Keys are pre-RoPE by default (``pre_rope``). A score keeps
whatever running tensors it needs in ``state.memory``. To add one: write the function in a module here and add
a line to ``SCORES``; ``TokenFilter(score=name)`` then accepts it. Scores are not bounded by 1: "nothing
filtered" is ``threshold=float("inf")``.
"""

from __future__ import annotations

from tokenfilter.algorithm.scores.draws import constant, random
from tokenfilter.algorithm.scores.norms import key_norm, value_norm
from tokenfilter.algorithm.scores.similarity import (
    FUSIONS,
    cumulative_mean,
    fuse,
    fuse_stacked,
    head_cosine,
    similarity,
    two_horizon,
)
from tokenfilter.algorithm.scores.state import ScoreFn, ScoreState

SCORES: dict[str, ScoreFn] = {
    "similarity": similarity,
    "cumulative-mean": cumulative_mean,
    "two-horizon": two_horizon,
    "key-norm": key_norm,
    "value-norm": value_norm,
    "random": random,
    "constant": constant,
}

__all__ = ["FUSIONS", "SCORES", "ScoreFn", "ScoreState", "fuse", "fuse_stacked", "head_cosine"]
