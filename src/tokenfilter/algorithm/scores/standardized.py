"""Key and value on a common scale: each one's two-horizon similarity standardized over the tokens seen so far.

The key and the value similarities of a layer do not run on the same scale (on SmolLM2-135M and Gemma 3 270M the
value cosines run well below the key cosines), so a raw fusion lets one of them decide: the lower of the two is
nearly always the value's (``fusion="kv-min"`` measures as the values alone). Here each part's similarity (the
two-horizon cosine, averaged over heads) becomes a z-score against the mean and spread of that part's similarities
over the row's real tokens up to and including this one, so a token is redundant in a part when it is more
redundant than that part usually is:

* ``standardized-min``: the lower z-score decides: filtered only when the key *and* the value are more redundant
  than usual;
* ``standardized-mean``: the mean of the two z-scores.

The statistics are those of every real token seen by the end of the call: in a prefill, the whole prompt's; in
decode, every token so far. So, like the random score, a sequence scored in several calls (chunked prefill) does not
give one call's scores. ``standardized-min-prefix`` standardizes each token with the tokens up to it, which would;
it measured worse on both models of the ladder (docs/ladder.md): a prompt's first tokens are standardized with
almost no spread. Nothing is calibrated: the model's own similarities, on the prompt at hand, set the scale.
"""

from __future__ import annotations

import torch

from tokenfilter.algorithm.scores.similarity import horizon_cosines
from tokenfilter.algorithm.scores.state import Score, ScoreState

_EPS = 1e-6  # added to each variance: the first token (no spread yet) scores 0
PARAMS = ("gamma",)


def part_similarities(keys: torch.Tensor, values: torch.Tensor, state: ScoreState) -> torch.Tensor:
    """Two-horizon similarity of the key and of the value, each averaged over heads: ``keys, values`` ``[B, N, H, d]``
    -> ``[B, N, 2]`` (key, value) float32. Keeps ``memory["anchors"]`` and ``memory["sum"]`` (``[B, 2, H, d]``)."""
    x = torch.stack([keys, values], dim=2)  # [B, N, 2, H, d]
    return horizon_cosines(x, state).mean(-1).amin(0)


def standardize(s: torch.Tensor, state: ScoreState, prefix: bool = False) -> torch.Tensor:
    """``s`` ``[B, N, P]`` -> z-scores ``[B, N, P]``: each entry against the mean and (population) variance of its
    part over the row's real entries seen by the end of this call (earlier calls' and all of this one's), or with
    ``prefix`` up to and including the entry. Keeps the running count, sum and sum of squares ``[B, 3, P]`` in
    ``memory["moments"]``; padding entries add nothing (their z-scores are meaningless)."""
    w = torch.ones_like(s[..., :1]) if state.valid is None else state.valid[..., None].to(s.dtype)
    s = torch.where(w > 0, s, 0.0)  # a padding entry's similarity may be anything
    before = state.memory.get("moments")
    if before is None:
        before = torch.zeros(s.shape[0], 3, s.shape[-1], device=s.device)
    terms = torch.stack([w.expand_as(s), s, s * s], dim=2)  # [B, N, 3, P]
    if prefix:
        moments = before[:, None] + terms.cumsum(1)  # [B, N, 3, P]: after each entry
        state.memory["moments"] = state.last(moments, before)
    else:
        moments = (before + terms.sum(1))[:, None]  # [B, 1, 3, P]: after the call
        state.memory["moments"] = moments[:, 0]
    count, total, squares = moments.clamp_min(0).unbind(2)
    mean = total / count.clamp_min(1)
    var = (squares / count.clamp_min(1) - mean * mean).clamp_min(0)
    return (s - mean) * (var + _EPS).rsqrt()


def standardized_min(keys: torch.Tensor, values: torch.Tensor, state: ScoreState) -> torch.Tensor:
    """The lower of the key's and the value's standardized similarity -> ``[B, N]``."""
    return standardize(part_similarities(keys, values, state), state).amin(-1)


def standardized_mean(keys: torch.Tensor, values: torch.Tensor, state: ScoreState) -> torch.Tensor:
    """The mean of the key's and the value's standardized similarity -> ``[B, N]``."""
    return standardize(part_similarities(keys, values, state), state).mean(-1)


def standardized_min_prefix(keys: torch.Tensor, values: torch.Tensor, state: ScoreState) -> torch.Tensor:
    """``standardized_min`` with prefix statistics (each token against the tokens up to it) -> ``[B, N]``."""
    return standardize(part_similarities(keys, values, state), state, prefix=True).amin(-1)


STANDARDIZED_MIN = Score(standardized_min, None, PARAMS)
STANDARDIZED_MEAN = Score(standardized_mean, None, PARAMS)
STANDARDIZED_MIN_PREFIX = Score(standardized_min_prefix, None, PARAMS)
