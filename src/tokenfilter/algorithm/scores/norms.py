"""Norm scores (no running state).

* ``key-norm``: the mean over heads of ``|k|``, so high-norm keys are filtered first. kvpress's ``KnormPress``
  (after Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression") keeps
  the keys of *low* norm: a low key norm goes with high attention, so the high-norm keys are the ones the
  queries read least. RoPE rotates pairs of features, so pre- and post-RoPE keys have the same norm.
* ``value-norm``: *minus* the mean over heads of ``|v|``, so small values are filtered first: a token's
  contribution to a head's output is its attention weight times its value, and a small value contributes
  little however it is attended (the value-norm argument of VATP, Guo et al., 2024, "Attention Score is not
  All You Need for Token Importance Indicator in KV Cache Reduction: Value Also Matters").
"""

from __future__ import annotations

import torch

from tokenfilter.algorithm.scores.state import ScoreState


def key_norm(keys: torch.Tensor, values: torch.Tensor, state: ScoreState) -> torch.Tensor:
    """``[B, N, H, d]`` -> ``[B, N]``: mean key norm over heads."""
    return keys.float().norm(dim=-1).mean(-1)


def value_norm(keys: torch.Tensor, values: torch.Tensor, state: ScoreState) -> torch.Tensor:
    """``[B, N, H, d]`` -> ``[B, N]``: minus the mean value norm over heads."""
    return -values.float().norm(dim=-1).mean(-1)
