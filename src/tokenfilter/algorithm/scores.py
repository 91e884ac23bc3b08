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
    mu_k, mu_v = s_k.mean(-1), s_v.mean(-1)
    if fusion == "mean":
        return (mu_k + mu_v) / 2
    if fusion == "key":
        return mu_k
    if fusion == "value":
        return mu_v
    if fusion != "variance":
        raise ValueError(f"Unknown fusion {fusion!r}; use one of {', '.join(FUSIONS)}.")
    sd_k, sd_v = s_k.std(-1, correction=0), s_v.std(-1, correction=0)
    inv_k, inv_v = 1 / (sd_k**2 + eps), 1 / (sd_v**2 + eps)
    w_k = inv_k / (inv_k + inv_v)
    return w_k * (mu_k - lam * sd_k) + (1 - w_k) * (mu_v - lam * sd_v)
