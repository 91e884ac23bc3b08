"""Redundancy score of a token: cosine similarity of its key and value to the anchors, fused over heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F

FUSIONS = ("variance", "mean", "key", "value")


def head_cosine(x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Per-head cosine similarity. ``x, anchor``: ``[..., H, d]`` -> ``[..., H]`` (float32)."""
    return F.cosine_similarity(x.float(), anchor.float(), dim=-1, eps=1e-8)


def fuse(s_k: torch.Tensor, s_v: torch.Tensor, fusion: str, lam: float, eps: float = 1e-6) -> torch.Tensor:
    """Fuse per-head key and value similarities ``[..., H]`` into one score ``[...]``.

    ``variance`` (default): each of K and V contributes ``mu - lam * sigma`` (population std over heads),
    weighted by its inverse variance, so the more consistent signal counts more and disagreement between
    heads lowers the score (the token is more likely kept).
    """
    return fuse_stacked(torch.stack([s_k, s_v], dim=-2), fusion, lam, eps)


def fuse_stacked(s: torch.Tensor, fusion: str, lam: float, eps: float = 1e-6) -> torch.Tensor:
    """``fuse`` on key and value similarities stacked as ``[..., 2, H]`` (keys first), in few operators:
    ``sum_i w_i (mu_i - lam sigma_i)`` with ``w_i = (1/(sigma_i^2+eps)) / sum_j (1/(sigma_j^2+eps))``."""
    if fusion == "key":
        return s[..., 0, :].mean(-1)
    if fusion == "value":
        return s[..., 1, :].mean(-1)
    mu = s.mean(-1)  # [..., 2]
    if fusion == "mean":
        return mu.mean(-1)
    if fusion != "variance":
        raise ValueError(f"Unknown fusion {fusion!r}; use one of {', '.join(FUSIONS)}.")
    sd = s.std(-1, correction=0)
    inv = 1 / (sd**2 + eps)
    return (inv * (mu - lam * sd)).sum(-1) / inv.sum(-1)

