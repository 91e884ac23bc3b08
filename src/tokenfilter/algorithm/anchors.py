"""Running per-layer anchors over real tokens: the EMA ``A_t = gamma * A_{t-1} + (1 - gamma) * x_t`` and the running
sum ``S_t = S_{t-1} + x_t`` (the cumulative mean's direction).

Neither depends on the filtering decision, so a whole chunk's anchors are one linear recurrence
``h_t = alpha * h_{t-1} + beta * x_t``, evaluated without a loop over tokens: every block of ``_BLOCK`` tokens is
scanned at once by one small lower-triangular matrix (all blocks in one matmul, from a zero start), the values at
the block ends are themselves such a recurrence with ``alpha ** _BLOCK`` and ``beta = 1`` (scanned the same way,
recursively), and each block then adds its incoming value times ``alpha ** (j + 1)``. On the CPU this is faster
than ``cumsum`` over the tokens for the sum too.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

_BLOCK = 32


@functools.lru_cache(maxsize=64)
def _weights(m: int, alpha: float, beta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(decay [m, m], carry [m, 1])``, float32, computed in float64 once per (m, alpha, beta, device):
    ``decay[j, i] = beta * alpha ** (j - i)`` on and below the diagonal (0 above) and ``carry[j] = alpha ** (j + 1)``.
    Cached: building them is a dozen small operators, more than the scan. Built outside inference mode, so that a
    forward with autograd after one under ``torch.inference_mode`` can use them."""
    with torch.inference_mode(False):
        idx = torch.arange(m, device=device)
        gap = idx[:, None] - idx[None, :]
        w = beta * torch.pow(torch.tensor(alpha, dtype=torch.float64, device=device), gap.clamp(min=0))
        decay = torch.where(gap >= 0, w, 0.0).float()
        carry = (alpha ** torch.arange(1, m + 1, dtype=torch.float64, device=device)).float()[:, None]
        return decay, carry


def _scan(x: torch.Tensor, carry: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """``x``: ``[B, N, F]`` float32, ``carry``: ``[B, F]`` (``h_{-1}``) -> ``h`` ``[B, N, F]``."""
    b, n, f = x.shape
    m = min(n, _BLOCK)
    decay, carry_w = _weights(m, alpha, beta, x.device)
    if n <= _BLOCK:
        return torch.matmul(decay, x).addcmul_(carry_w, carry[:, None, :])
    blocks = -(-n // m)
    # [B, blocks, m, F] (a view when the blocks fill the tokens exactly)
    xb = (x if n == blocks * m else F.pad(x, (0, 0, 0, blocks * m - n))).view(b, blocks, m, f)
    local = torch.matmul(decay, xb)  # [B, blocks, m, F]: each block from a zero start
    # the value at the end of block k is alpha ** m * (end of block k-1) + the local end of block k
    ends = _scan(local[:, :, -1], carry, alpha**m, 1.0)  # [B, blocks, F]
    incoming = torch.cat([carry[:, None], ends[:, :-1]], dim=1)
    out = local.addcmul_(carry_w, incoming[:, :, None, :])
    return out.reshape(b, blocks * m, f)[:, :n]


def one_step(h: torch.Tensor, x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """One token of the recurrence: ``alpha * h + beta * x`` (float32), in two operators (the second multiplies and
    adds at once). A one-token call of the scans and the scores' decode steps both compute it here, so their
    numbers agree bit for bit."""
    return torch.add(alpha * h, x, alpha=beta)


def ema_step(anchor: torch.Tensor, x: torch.Tensor, gamma: float) -> torch.Tensor:
    """``ema_scan`` of one token: ``gamma * anchor + (1 - gamma) * x``, by ``one_step``."""
    return one_step(anchor, x, gamma, 1 - gamma)


def _linear_scan(x: torch.Tensor, init: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    b, n, h, d = x.shape
    x = x.float().reshape(b, n, h * d)
    carry = init.float().reshape(b, h * d)
    if n == 1:
        return one_step(carry, x[:, 0], alpha, beta).reshape(b, 1, h, d)
    return _scan(x, carry, float(alpha), float(beta)).reshape(b, n, h, d)


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
    return _linear_scan(x, init, gamma, 1 - gamma)


def sum_scan(x: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
    """Running sums: ``[B, N, H, d]`` tokens, ``init`` ``[B, H, d]`` the sum before ``x[:, 0]`` -> ``[B, N, H, d]``
    float32, ``out[:, j] = init + x[:, 0] + ... + x[:, j]`` (to float rounding: blocked, not left to right)."""
    return _linear_scan(x, init, 1.0, 1.0)
