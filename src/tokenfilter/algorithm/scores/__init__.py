"""Scores as a registry (kvpress's shape): one small function per score, one signature, chosen by name.

Every score is a ``Score``: a ``ScoreFn`` ``(keys [B, N, H, d], values [B, N, H, d], state: ScoreState) -> [B, N]``
float32, higher = more redundant (filtered first), with, where it has one, its one-token decode step beside it
and the ``TokenFilter`` fields it reads (``state.params``). Keys are pre-RoPE by default (``pre_rope``). A score
keeps whatever running tensors it needs in ``state.memory``. To add one: write the function (and, if decode speed
matters, its step) in one module here and add a line to ``SCORES``; ``TokenFilter(score=name)`` then accepts it.
Scores are not bounded by 1: "nothing filtered" is ``threshold=float("inf")``.
"""

from __future__ import annotations

from tokenfilter.algorithm.scores.draws import constant, random
from tokenfilter.algorithm.scores.norms import key_norm, value_norm
from tokenfilter.algorithm.scores.similarity import (
    CUMULATIVE_MEAN,
    FUSIONS,
    SIMILARITY,
    TWO_HORIZON,
    fuse,
    fuse_stacked,
    head_cosine,
)
from tokenfilter.algorithm.scores.standardized import STANDARDIZED_MEAN, STANDARDIZED_MIN, STANDARDIZED_MIN_PREFIX
from tokenfilter.algorithm.scores.state import Score, ScoreFn, ScoreState, StepFn

SCORES: dict[str, Score] = {
    "similarity": SIMILARITY,
    "cumulative-mean": CUMULATIVE_MEAN,
    "two-horizon": TWO_HORIZON,
    "standardized-min": STANDARDIZED_MIN,
    "standardized-mean": STANDARDIZED_MEAN,
    "standardized-min-prefix": STANDARDIZED_MIN_PREFIX,
    "key-norm": Score(key_norm),
    "value-norm": Score(value_norm),
    "random": Score(random),
    "constant": Score(constant),
}

__all__ = ["FUSIONS", "SCORES", "Score", "ScoreFn", "ScoreState", "StepFn", "fuse", "fuse_stacked", "head_cosine"]
