"""Redundancy score of a token: cosine similarity of its key and value to running anchors, fused over heads.

* ``similarity`` (the paper's, the default): anchors are the EMA ``A_t = gamma A_{t-1} + (1 - gamma) x_t``;
* ``cumulative-mean``: anchors are the mean of every earlier real token, a horizon that never forgets (a token
  unlike the whole past is kept, not only one unlike the last ~1/(1-gamma) tokens);
* ``two-horizon``: the lower of the two, so a token is filtered only when it is redundant with both its recent
  context and the whole past. A rare fact is novel against the long horizon even after its first tokens have
  pulled the short anchor towards it (the EMA alone calls the later digits of a number redundant).

``head_cosine`` and ``fuse_stacked`` run once per filtered layer and call, on tensors that are tiny in decode,
so they are written in as few operators as the maths allows: the fixed cost per operator, not the arithmetic,
is what the filter adds to a decode step.

Each score comes with its decode step (``*_step``): one token per row, on tensors of a few hundred numbers, where
the cost is the number of operators launched. The step computes the same products, reduced over the same rows, so
scores and memories are bit for bit the score's (``tests/test_engine_fused.py``), in about half the operators: the
key and value of all heads as one tensor, no scan, and the three dot products of the cosine (x.a, x.x, a.a) as one
product and one sum over the stacked pair (x, a).
"""

from __future__ import annotations

import torch

from tokenfilter.algorithm.anchors import ema_scan, ema_step, sum_scan
from tokenfilter.algorithm.scores.state import Score, ScoreState

FUSIONS = ("variance", "mean", "key", "value", "min", "key-min", "kv-min")
KEY_FUSIONS = ("key", "key-min")  # the fusions that read the key similarities only
_FEW = 1024  # up to this many similarities, fewer operators beat faster ones
_EPS2 = 1e-8 * 1e-8  # head_cosine's eps, squared
PARAMS = ("gamma", "fusion", "lam")  # the TokenFilter fields these scores read


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


def fuse_stacked(
    s: torch.Tensor, fusion: str, lam: float, eps: float = 1e-6, few: bool | None = None
) -> torch.Tensor:
    """``fuse`` on key and value similarities stacked as ``[..., 2, H]`` (keys first). ``few`` (default: at most
    ``_FEW`` similarities) picks the formula for few rows; a caller that fuses several scores' similarities at once
    passes what one score's call would pick, so that each gives the numbers it gives alone.

    ``sum_i w_i (mu_i - lam sigma_i)`` with ``w_i = (1/v_i) / (1/v_k + 1/v_v)``, ``v_i = sigma_i^2 + eps``;
    with two terms the weights are ``w_k = v_v / (v_k + v_v)`` and ``w_v = v_k / (v_k + v_v)``, which is
    how it is computed (no reciprocals).
    """
    if fusion == "key":  # the keys alone (the only part: one reduction)
        return s.mean((-2, -1)) if s.shape[-2] == 1 else s[..., 0, :].mean(-1)
    if fusion == "value":
        return s[..., 1, :].mean(-1)
    if fusion == "mean":
        return s.mean((-2, -1))
    if fusion == "min":  # the most novel head decides: a token one head needs is kept
        return s.amin(-1).mean(-1)
    if fusion == "key-min":  # the same on the keys alone
        return s[..., 0, :].amin(-1)
    if fusion == "kv-min":  # redundant only when the key and the value both are (each averaged over heads)
        return s.mean(-1).amin(-1)
    if fusion != "variance":
        raise ValueError(f"Unknown fusion {fusion!r}; use one of {', '.join(FUSIONS)}.")
    if (s.numel() <= _FEW) if few is None else few:  # decode: one operator for both statistics
        sd, mu = torch.std_mean(s, -1, correction=0)  # [..., 2]
        var = torch.addcmul(torch.full_like(sd, eps), sd, sd)
    else:  # prefill: std_mean's reduction over a handful of heads is several times slower than this on CPU
        mu = s.mean(-1)
        var = (s - mu[..., None]).square().mean(-1)
        sd = var.sqrt()
        var = var + eps
    return (var.flip(-1) * torch.add(mu, sd, alpha=-lam)).sum(-1) / var.sum(-1)


def scored_parts(keys: torch.Tensor, values: torch.Tensor, fusion: str) -> torch.Tensor:
    """``[B, N, 2, H, d]`` (keys, then values) or, for a fusion of the keys alone (which never reads the value
    similarities), ``[B, N, 1, H, d]``: the values are left out of the anchors altogether."""
    return keys[:, :, None] if fusion in KEY_FUSIONS else torch.stack([keys, values], dim=2)


def _to_previous(x: torch.Tensor, xx: torch.Tensor, after: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """``head_cosine`` of each token ``x`` ``[B, N, P, H, d]`` to the anchor before its update -> ``[B, N, P, H]``:
    ``first`` ``[B, P, H, d]`` for token 0, ``after[:, t - 1]`` for token t (``after``: the anchors after each
    token). ``xx``: ``(x * x).sum(-1)``. The same products as ``head_cosine(x, previous)`` without building
    ``previous`` (a copy of every anchor): the shift is taken on the reductions."""
    dot = torch.cat([(x[:, :1] * first[:, None]).sum(-1), (x[:, 1:] * after[:, :-1]).sum(-1)], dim=1)
    aa = torch.cat([(first * first).sum(-1)[:, None], (after[:, :-1] * after[:, :-1]).sum(-1)], dim=1)
    return dot * (xx * aa).clamp_min(_EPS2).rsqrt()


def _ema_anchors(x: torch.Tensor, state: ScoreState) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[B, N, P, H, d]`` float32 -> ``(after [B, N, P, H, d], first [B, P, H, d])``: the EMA anchors after
    each token and the anchor before token 0 (a row's first token ever is its own anchor, ``A_{-1} = x_0``).
    Advances ``state.memory["anchors"]``."""
    b, n, parts, heads, d = x.shape
    before = state.memory.get("anchors")
    if before is None:
        before = torch.zeros(b, parts, heads, d, device=x.device)
    first = torch.where((state.seen > 0)[:, None, None, None], before, x[:, 0])
    # the K and V anchors are independent recurrences over features: scan them as P * H heads at once
    after = ema_scan(x.reshape(b, n, parts * heads, d), first.reshape(b, parts * heads, d), state.params["gamma"])
    after = after.reshape(b, n, parts, heads, d)
    state.memory["anchors"] = state.last(after, before)
    return after, first


def _running_sums(x: torch.Tensor, state: ScoreState) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[B, N, P, H, d]`` float32, padding zeroed -> ``(after, first)`` as ``_ema_anchors``, for the sum of
    every earlier real token (the cosine to the sum is the cosine to the mean: no division); a row's first token
    ever is compared with itself. Advances ``state.memory["sum"]``."""
    b, n, parts, heads, d = x.shape
    before = state.memory.get("sum")
    if before is None:
        before = torch.zeros(b, parts, heads, d, device=x.device)
    after = sum_scan(x.reshape(b, n, parts * heads, d), before.reshape(b, parts * heads, d)).view(x.shape)
    first = torch.where((state.seen > 0)[:, None, None, None], before, x[:, 0])
    state.memory["sum"] = state.last(after, before)
    return after, first


def _zero_padding(x: torch.Tensor, state: ScoreState) -> torch.Tensor:
    """Padding entries (after a row's real ones) zeroed: they add nothing to a running sum."""
    return x if state.valid is None else x * state.valid[:, :, None, None, None]


def ema_cosines(x: torch.Tensor, state: ScoreState) -> torch.Tensor:
    """Per-head cosine of each token ``x`` ``[B, N, P, H, d]`` (P parts: keys, values) to its EMA anchor before its
    update -> ``[B, N, P, H]`` float32. Keeps the anchors ``[B, P, H, d]`` in ``state.memory["anchors"]``."""
    x = x.float()
    after, first = _ema_anchors(x, state)
    return _to_previous(x, (x * x).sum(-1), after, first)


def mean_cosines(x: torch.Tensor, state: ScoreState) -> torch.Tensor:
    """Per-head cosine of each token ``x`` ``[B, N, P, H, d]`` to the mean of every earlier real token (the first
    token: to itself) -> ``[B, N, P, H]`` float32. Keeps the running sums ``[B, P, H, d]`` in
    ``state.memory["sum"]``. The cosine is taken against the sum, which points the same way as the mean: no division,
    and the decode step reads the running sum as it is."""
    x = _zero_padding(x.float(), state)
    after, first = _running_sums(x, state)
    return _to_previous(x, (x * x).sum(-1), after, first)


def horizon_cosines(x: torch.Tensor, state: ScoreState) -> torch.Tensor:
    """``ema_cosines`` and ``mean_cosines`` together -> ``[2, B, N, P, H]`` (EMA first), the same numbers: the
    token's own norms are reduced once for both. Keeps both memories."""
    x = x.float()
    xx = (x * x).sum(-1)
    ema = _to_previous(x, xx, *_ema_anchors(x, state))
    x = _zero_padding(x, state)
    return torch.stack([ema, _to_previous(x, xx, *_running_sums(x, state))])


def similarity(keys: torch.Tensor, values: torch.Tensor, state: ScoreState) -> torch.Tensor:
    """The SPEC's score: fused cosine of ``k_t, v_t`` ``[B, N, H, d]`` to the EMA anchors before their update
    -> ``[B, N]``. Keeps the anchors ``[B, 2, H, d]`` (key, then value; ``[B, 1, H, d]``, the key's, under a fusion
    of the keys alone) in ``state.memory["anchors"]``."""
    fusion, lam = state.params["fusion"], state.params["lam"]
    return fuse_stacked(ema_cosines(scored_parts(keys, values, fusion), state), fusion, lam).float()


def cumulative_mean(keys: torch.Tensor, values: torch.Tensor, state: ScoreState) -> torch.Tensor:
    """Fused cosine to the mean of every earlier real token (the first token: to itself) -> ``[B, N]``.
    Keeps the running sums ``[B, 2, H, d]`` in ``state.memory["sum"]`` (``[B, 1, H, d]``, the keys', under a
    fusion of the keys alone)."""
    fusion, lam = state.params["fusion"], state.params["lam"]
    return fuse_stacked(mean_cosines(scored_parts(keys, values, fusion), state), fusion, lam).float()


def two_horizon(keys: torch.Tensor, values: torch.Tensor, state: ScoreState) -> torch.Tensor:
    """``min(similarity, cumulative_mean)`` -> ``[B, N]``; keeps both scores' memories (``anchors`` and ``sum``).
    Both horizons' cosines come from one ``horizon_cosines`` and are fused in one call, each as its own score's
    call would fuse it."""
    fusion, lam = state.params["fusion"], state.params["lam"]
    cos = horizon_cosines(scored_parts(keys, values, fusion), state)
    return fuse_stacked(cos, fusion, lam, few=cos.numel() <= 2 * _FEW).amin(0).float()


# -- decode steps ------------------------------------------------------------------------------------------------
def _step_parts(k: torch.Tensor, v: torch.Tensor, fusion: str) -> torch.Tensor:
    """``scored_parts`` of one token per row (``k, v``: ``[B, 1, H, d]``) -> ``[B, P, H, d]`` float32: the token
    dimension of size 1 becomes the parts'."""
    x = k if fusion in KEY_FUSIONS else torch.cat([k, v], dim=1)
    return x if x.dtype == torch.float32 else x.float()


def similarity_step(k: torch.Tensor, v: torch.Tensor, state: ScoreState) -> torch.Tensor | None:
    """``similarity`` of one decode token per row, ``k, v``: ``[B, 1, H, d]`` -> ``[B]`` float32, with the anchors
    ``memory["anchors"]`` advanced past it. None (nothing done) when the anchors are not there yet."""
    before = state.memory.get("anchors")
    if before is None:
        return None
    gamma, fusion, lam = (state.params[p] for p in PARAMS)
    x = _step_parts(k, v, fusion)  # [B, 2 (or 1: keys), H, d]
    state.memory["anchors"] = ema_step(before, x, gamma)
    pair = torch.stack([x, before])  # [2, B, 2, H, d]: the token and the anchor before its update
    gram = (pair[:, None] * pair[None]).sum(-1)  # [2, 2, B, 2, H]: x.x, x.a / a.x, a.a
    cos = gram[0, 1] * (gram[0, 0] * gram[1, 1]).clamp_min(_EPS2).rsqrt()  # [B, 2, H]
    return fuse_stacked(cos, fusion, lam)


def cumulative_mean_step(k: torch.Tensor, v: torch.Tensor, state: ScoreState) -> torch.Tensor | None:
    """``cumulative-mean`` of one decode token per row (every row past its first token) -> ``[B]``, with
    ``memory["sum"]`` advanced past it: the score's expressions on one token, without its scan. None (nothing
    done) when the sums are not there yet."""
    before = state.memory.get("sum")
    if before is None:
        return None
    fusion, lam = state.params["fusion"], state.params["lam"]
    x = _step_parts(k, v, fusion)
    state.memory["sum"] = before + x
    return fuse_stacked(head_cosine(x, before), fusion, lam).float()  # the cosine to the sum before the token


def two_horizon_step(k: torch.Tensor, v: torch.Tensor, state: ScoreState) -> torch.Tensor | None:
    """``two-horizon`` of one decode token per row: the lower of the two steps above, computed together (one
    stack of the token and its two anchors, their cosines' dot products in two reductions)."""
    anchors, total = state.memory.get("anchors"), state.memory.get("sum")
    if anchors is None or total is None:
        return None  # neither memory is touched
    gamma, fusion, lam = (state.params[p] for p in PARAMS)
    x = _step_parts(k, v, fusion)  # [B, P, H, d]
    state.memory["anchors"] = ema_step(anchors, x, gamma)
    state.memory["sum"] = total + x
    trio = torch.stack([x, anchors, total])  # [3, B, P, H, d]: the token, the EMA anchor and the sum before it
    cross = (trio * x).sum(-1)  # [3, B, P, H]: x.x, a.x, s.x
    own = (trio * trio).sum(-1)  # x.x, a.a, s.s
    cos = (cross * (own * own[0]).clamp_min(_EPS2).rsqrt())[1:]  # [2, B, P, H]: head_cosine's products, in its order
    # both horizons fused in one call (the reductions are per row), each as its own score's call would
    return fuse_stacked(cos, fusion, lam, few=cos.numel() <= 2 * _FEW).amin(0)


SIMILARITY = Score(similarity, similarity_step, PARAMS)
CUMULATIVE_MEAN = Score(cumulative_mean, cumulative_mean_step, PARAMS)
TWO_HORIZON = Score(two_horizon, two_horizon_step, PARAMS)
