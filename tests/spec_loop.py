"""An independent, deliberately slow implementation of the SPEC's scoring and decisions.

It walks each sequence token by token in plain Python/torch, with no code shared with the package:
anchors, per-head cosine, variance-aware fusion, warm-up, padding, ratio and threshold rules.
"""

from __future__ import annotations

import math

import torch


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a @ b) / max(float(a.norm() * b.norm()), 1e-8))


def _fuse(sk: list[float], sv: list[float], fusion: str, lam: float, eps: float = 1e-6) -> float:
    h = len(sk)
    mk, mv = sum(sk) / h, sum(sv) / h
    if fusion == "mean":
        return (mk + mv) / 2
    if fusion == "key":
        return mk
    if fusion == "value":
        return mv
    dk = math.sqrt(sum((x - mk) ** 2 for x in sk) / h)
    dv = math.sqrt(sum((x - mv) ** 2 for x in sv) / h)
    ik, iv = 1 / (dk * dk + eps), 1 / (dv * dv + eps)
    wk = ik / (ik + iv)
    return wk * (mk - lam * dk) + (1 - wk) * (mv - lam * dv)


def loop_scores(keys, values, real, gamma=0.9, fusion="variance", lam=1.0):
    """``keys, values``: ``[B, T, H, d]``; ``real``: ``[B, T]`` -> scores ``[B][T]`` (None for padding/first)."""
    out = []
    for b in range(keys.shape[0]):
        ak = av = None
        row = []
        for t in range(keys.shape[1]):
            if not real[b, t]:
                row.append(None)
                continue
            k, v = keys[b, t].double(), values[b, t].double()
            if ak is None:
                ak, av = k.clone(), v.clone()
            sk = [_cos(k[h], ak[h]) for h in range(k.shape[0])]
            sv = [_cos(v[h], av[h]) for h in range(v.shape[0])]
            row.append(_fuse(sk, sv, fusion, lam))
            ak = gamma * ak + (1 - gamma) * k
            av = gamma * av + (1 - gamma) * v
        out.append(row)
    return out


def loop_decisions(scores, warmup, *, tau=None, ratio=None):
    """Threshold rule (``tau``) or prefill ratio rule (``ratio``), token by token / row by row."""
    out = []
    for row in scores:
        real_idx = 0
        eligible = []
        for t, s in enumerate(row):
            if s is None:
                continue
            if real_idx >= warmup:
                eligible.append((s, t))
            real_idx += 1
        filtered = set()
        if tau is not None:
            filtered = {t for s, t in eligible if s > tau}
        else:
            n_real = sum(s is not None for s in row)
            k = min(len(eligible), int(torch.round(torch.tensor(ratio * n_real)).item()))
            filtered = {t for _, t in sorted(eligible, key=lambda p: -p[0])[:k]}
        out.append([t in filtered for t in range(len(row))])
    return out
