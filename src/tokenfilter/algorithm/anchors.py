"""Running per-layer anchors: ``A_t = gamma * A_{t-1} + (1 - gamma) * x_t`` over real tokens.

The update does not depend on the filtering decision, so the anchors of a whole chunk are one linear
recurrence. ``ema_scan`` evaluates it in blocks: inside a block with a small lower-triangular decay
matrix, across blocks with a carried state, so the work is vectorised with no loop over tokens.
"""

from __future__ import annotations

import torch

_BLOCK = 64


def ema_scan(x: torch.Tensor, init: torch.Tensor, gamma: float) -> torch.Tensor:
    """Anchors after each token of a left-aligned run of real tokens.

    Args:
        x: ``[B, N, H, d]`` token vectors (row b is valid up to its own count; later entries are ignored
            by causality, they only ever influence anchors after them).
        init: ``[B, H, d]`` the anchor before ``x[:, 0]`` (``A_{-1}``).
        gamma: decay in [0, 1).

    Returns:
        ``[B, N, H, d]`` float32: ``out[:, j] = A_j`` (the anchor *after* token j's update).
    """
    b, n, h, d = x.shape
    x = x.float().reshape(b, n, h * d)
    carry = init.float().reshape(b, h * d)
    if n == 1:
        return (gamma * carry + (1 - gamma) * x[:, 0]).reshape(b, 1, h, d)
    blk = min(_BLOCK, n)
    idx = torch.arange(blk, device=x.device)
    expo = (idx[:, None] - idx[None, :]).clamp(min=0).float()
    decay = torch.where(idx[:, None] >= idx[None, :], (1 - gamma) * gamma**expo, torch.zeros((), device=x.device))
    carry_w = gamma ** (idx.float() + 1)  # weight of the incoming carry on each position of a block
    outs = []
    for s in range(0, n, blk):
        xb = x[:, s : s + blk]
        m = xb.shape[1]
        ab = torch.einsum("ji,bif->bjf", decay[:m, :m], xb) + carry_w[:m, None] * carry[:, None, :]
        outs.append(ab)
        carry = ab[:, -1]
    return torch.cat(outs, dim=1).reshape(b, n, h, d)
