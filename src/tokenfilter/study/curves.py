"""Perplexity-vs-FLOPs curves: a method's PPL at a given fraction of FLOPs saved, log-linear between its
measured points, with the dense model as the point (0, dense PPL)."""

from __future__ import annotations

import math

import numpy as np


def matched_log_ppl(points: list[dict], dense_ppl: float, levels: list[float]) -> list[float]:
    """log PPL of one method interpolated at FLOPs-saved ``levels`` (``inf`` beyond the method's reach).

    ``points``: dicts with ``flops_saved`` and ``ppl``; the dense model is the point (0, dense_ppl)."""
    xs = [0.0] + [p["flops_saved"] for p in points]
    ys = [math.log(dense_ppl)] + [math.log(p["ppl"]) for p in points]
    order = np.argsort(xs)
    xs, ys = np.asarray(xs)[order], np.asarray(ys)[order]
    return [float(np.interp(x, xs, ys)) if x <= xs[-1] + 1e-9 else math.inf for x in levels]
