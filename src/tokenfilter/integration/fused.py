"""Fused decode-step versions of the anchor scores, for the lean decode paths of ``attention.py``.

A decode step scores one token per row, on tensors of a few hundred numbers: what it costs is the number of
operators launched, not the arithmetic. The registry's ``similarity`` (``algorithm/scores/similarity.py``) is
written for any number of tokens and padding; for the one case the lean decode paths meet (one real token per row,
every row past its first token, so the anchors exist) ``similarity_step`` computes the same score and the same
anchor update in about half the operators: the key and value of all heads as one ``[B, 2, H, d]`` tensor, no
scan, and the three dot products of the cosine (x.a, x.x, a.a) as one product and one sum over the stacked pair
(x, a). The fusion over heads is the registry's own ``fuse_stacked``. ``cumulative_mean_step`` and
``two_horizon_step`` (the default score) do the same for the running mean and for the lower of the two.

The same products are reduced over the same rows, so scores and anchors are bit for bit the registry's
(``tests/test_engine_fused.py``; ``test_decode_fast_path_scores_are_bitwise_the_general_ones`` end to end).
"""

from __future__ import annotations

import torch

from tokenfilter.algorithm.scores import fuse_stacked, head_cosine
from tokenfilter.algorithm.scores.similarity import scored_parts

_EPS2 = 1e-8 * 1e-8  # head_cosine's eps, squared


def fused_score(name: str):
    """The fused decode-step function for the registry score ``name``, or None where there is none. Every one
    has the signature ``(k, v, memory, seen, gamma, fusion, lam) -> [B] | None`` (None: nothing done)."""
    return {"similarity": similarity_step, "cumulative-mean": cumulative_mean_step,
            "two-horizon": two_horizon_step}.get(name)


def similarity_step(
    k: torch.Tensor, v: torch.Tensor, memory: dict[str, torch.Tensor], seen: torch.Tensor, gamma: float,
    fusion: str, lam: float
) -> torch.Tensor | None:
    """The ``similarity`` score of one decode token per row, ``k, v``: ``[B, 1, H, d]`` -> ``[B]`` float32, with
    the anchors ``memory["anchors"]`` (``[B, 2, H, d]``; ``[B, 1, H, d]`` under a key fusion) advanced past it.
    Returns None (nothing done) when the anchors are not there yet: the caller then uses the registry's score."""
    before = memory.get("anchors")
    if before is None:
        return None
    x = scored_parts(k, v, fusion)[:, 0]  # [B, 2 (or 1: keys), H, d]
    if x.dtype != torch.float32:
        x = x.float()
    memory["anchors"] = gamma * before + (1 - gamma) * x  # ema_scan's one-token update, the same expression
    pair = torch.stack([x, before])  # [2, B, 2, H, d]: the token and the anchor before its update
    gram = (pair[:, None] * pair[None]).sum(-1)  # [2, 2, B, 2, H]: x.x, x.a / a.x, a.a
    cos = gram[0, 1] * (gram[0, 0] * gram[1, 1]).clamp_min(_EPS2).rsqrt()  # [B, 2, H]
    return fuse_stacked(cos, fusion, lam)


def cumulative_mean_step(
    k: torch.Tensor, v: torch.Tensor, memory: dict[str, torch.Tensor], seen: torch.Tensor, gamma: float,
    fusion: str, lam: float
) -> torch.Tensor | None:
    """The ``cumulative-mean`` score of one decode token per row (``seen``: ``[B]`` real tokens before it, all
    >= 1) -> ``[B]``, with ``memory["sum"]`` advanced past it; the registry's expressions on one token, without
    its scan over tokens. None (nothing done) when the sums are not there yet."""
    before = memory.get("sum")
    if before is None:
        return None
    b = k.shape[0]
    x = scored_parts(k, v, fusion)[:, 0].float()
    after = before + x
    prev = (after - x) / seen.clamp(min=1).view(b, 1, 1, 1)  # the registry's (after - x) / count
    memory["sum"] = after
    return fuse_stacked(head_cosine(x, prev), fusion, lam).float()


def two_horizon_step(
    k: torch.Tensor, v: torch.Tensor, memory: dict[str, torch.Tensor], seen: torch.Tensor, gamma: float,
    fusion: str, lam: float
) -> torch.Tensor | None:
    """The ``two-horizon`` score of one decode token per row: the lower of the two steps above."""
    if memory.get("anchors") is None or memory.get("sum") is None:
        return None  # neither memory is touched
    short = similarity_step(k, v, memory, seen, gamma, fusion, lam)
    return torch.minimum(short.float(), cumulative_mean_step(k, v, memory, seen, gamma, fusion, lam))
