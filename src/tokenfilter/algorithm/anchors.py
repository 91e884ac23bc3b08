"""Running per-layer anchors: ``A_t = gamma * A_{t-1} + (1 - gamma) * x_t`` over real tokens.

The update does not depend on the filtering decision, so the anchors of a whole chunk are one linear
recurrence. ``ema_scan`` evaluates it without a loop over tokens: every block of ``_BLOCK`` tokens is
scanned at once by one small lower-triangular decay matrix (all blocks in one matmul, from a zero start),
the anchors at the block ends are themselves an EMA with decay ``gamma ** _BLOCK`` (scanned the same way,
recursively), and each block then adds its incoming anchor times ``gamma ** (j + 1)``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

_BLOCK = 32


@functools.lru_cache(maxsize=64)
def _weights(m: int, gamma: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(decay [m, m], carry [m, 1])``, float32, computed in float64 once per (m, gamma, device):
    ``decay[j, i] = (1 - gamma) * gamma ** (j - i)`` on and below the diagonal (0 above) and
    ``carry[j] = gamma ** (j + 1)``. Cached: building them is a dozen small operators, more than the scan. Built
    outside inference mode, so that a forward with autograd after one under ``torch.inference_mode`` can use them."""
    with torch.inference_mode(False):
        return _build_weights(m, gamma, device)


def _build_weights(m: int, gamma: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.arange(m, device=device)
    gap = idx[:, None] - idx[None, :]
    w = (1 - gamma) * torch.pow(torch.tensor(gamma, dtype=torch.float64, device=device), gap.clamp(min=0))
    decay = torch.where(gap >= 0, w, 0.0).float()
    carry = (gamma ** torch.arange(1, m + 1, dtype=torch.float64, device=device)).float()[:, None]
    return decay, carry


def _decay(m: int, gamma: float, device: torch.device) -> torch.Tensor:
    """``[m, m]``: ``(1 - gamma) * gamma ** (j - i)`` on and below the diagonal, 0 above."""
    return _weights(m, float(gamma), torch.device(device))[0]


def _scan(x: torch.Tensor, carry: torch.Tensor, gamma: float) -> torch.Tensor:
    """``x``: ``[B, N, F]`` float32, ``carry``: ``[B, F]`` -> anchors ``[B, N, F]``."""
    b, n, f = x.shape
    m = min(n, _BLOCK)
    decay, carry_w = _weights(m, float(gamma), x.device)
    if n <= _BLOCK:
        return torch.matmul(decay, x).addcmul_(carry_w, carry[:, None, :])
    blocks = -(-n // m)
    xb = F.pad(x, (0, 0, 0, blocks * m - n)).view(b, blocks, m, f)
    local = torch.matmul(decay, xb)  # [B, blocks, m, F]: each block from a zero start
    g_block = gamma**m
    # the anchor at the end of block k is g_block * (end of block k-1) + local end of block k
    ends = _scan(local[:, :, -1] / (1 - g_block), carry, g_block)  # [B, blocks, F]
    incoming = torch.cat([carry[:, None], ends[:, :-1]], dim=1)
    out = local.addcmul_(carry_w, incoming[:, :, None, :])
    return out.reshape(b, blocks * m, f)[:, :n]


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
    return _scan(x, carry, gamma).reshape(b, n, h, d)
