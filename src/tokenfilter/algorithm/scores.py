"""Redundancy score of a token: cosine similarity of its key and value to the anchors, fused over heads.

Both functions run once per filtered layer and call, on tensors that are tiny in decode, so they are
written in as few operators as the maths allows: the fixed cost per operator, not the arithmetic, is what
the filter adds to a decode step.
"""

from __future__ import annotations

import torch

FUSIONS = ("variance", "mean", "key", "value")
_FEW = 1024  # up to this many similarities, fewer operators beat faster ones


def head_cosine(x: torch.Tensor, anchor: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-head cosine similarity. ``x, anchor``: ``[..., H, d]`` -> ``[..., H]`` (float32).

    ``x . a / max(|x| |a|, eps)``, as ``torch.nn.functional.cosine_similarity`` defines it.
    """
    x, anchor = x.float(), anchor.float()
    dot = (x * anchor).sum(-1)
    norms2 = (x * x).sum(-1) * (anchor * anchor).sum(-1)
    return dot * norms2.clamp_min(eps * eps).rsqrt()


def fuse(s_k: torch.Tensor, s_v: torch.Tensor, fusion: str, lam: float, eps: float = 1e-6) -> torch.Tensor:
    """Fuse per-head key and value similarities ``[..., H]`` into one score ``[...]``.

    ``variance`` (default): each of K and V contributes ``mu - lam * sigma`` (population std over heads),
    weighted by its inverse variance, so the more consistent signal counts more and disagreement between
    heads lowers the score (the token is more likely kept).
    """
    return fuse_stacked(torch.stack([s_k, s_v], dim=-2), fusion, lam, eps)


def fuse_stacked(s: torch.Tensor, fusion: str, lam: float, eps: float = 1e-6) -> torch.Tensor:
    """``fuse`` on key and value similarities stacked as ``[..., 2, H]`` (keys first).

    ``sum_i w_i (mu_i - lam sigma_i)`` with ``w_i = (1/v_i) / (1/v_k + 1/v_v)``, ``v_i = sigma_i^2 + eps``;
    with two terms the weights are ``w_k = v_v / (v_k + v_v)`` and ``w_v = v_k / (v_k + v_v)``, which is
    how it is computed (no reciprocals).
    """
    if fusion == "key":
        return s[..., 0, :].mean(-1)
    if fusion == "value":
        return s[..., 1, :].mean(-1)
    if fusion == "mean":
        return s.mean((-2, -1))
    if fusion != "variance":
        raise ValueError(f"Unknown fusion {fusion!r}; use one of {', '.join(FUSIONS)}.")
    if s.numel() <= _FEW:  # decode: one operator for both statistics
        sd, mu = torch.std_mean(s, -1, correction=0)  # [..., 2]
        var = torch.addcmul(torch.full_like(sd, eps), sd, sd)
    else:  # prefill: std_mean's reduction over a handful of heads is several times slower than this on CPU
        mu = s.mean(-1)
        var = (s - mu[..., None]).square().mean(-1)
        sd = var.sqrt()
        var = var + eps
    return (var.flip(-1) * torch.add(mu, sd, alpha=-lam)).sum(-1) / var.sum(-1)
