"""Paired, task-stratified bootstrap of the difference in average accuracy between two methods."""

from __future__ import annotations

import numpy as np


def paired_interval(a: dict[str, dict[int, float]], b: dict[str, dict[int, float]], resamples: int = 2000,
                    level: float = 0.95, seed: int = 0) -> dict:
    """``a``, ``b``: task -> {doc id: correctness}, on the same documents. The average accuracy is the mean over
    tasks of the per-task mean; documents are resampled within each task, the same draw for both methods.

    Returns ``{"diff": avg(a) - avg(b), "lo": ..., "hi": ...}`` (the central ``level`` interval)."""
    rng = np.random.default_rng(seed)
    diffs_per_task = []
    for task, docs_a in a.items():
        docs_b = b[task]
        if set(docs_a) != set(docs_b):
            raise ValueError(f"Task {task}: the two methods were scored on different documents.")
        ids = sorted(docs_a)
        diffs_per_task.append(np.array([docs_a[i] - docs_b[i] for i in ids], dtype=float))
    point = float(np.mean([d.mean() for d in diffs_per_task]))
    boot = np.zeros(resamples)
    for d in diffs_per_task:
        idx = rng.integers(0, len(d), size=(resamples, len(d)))
        boot += d[idx].mean(axis=1)
    boot /= len(diffs_per_task)
    tail = (1 - level) / 2
    return {"diff": point, "lo": float(np.quantile(boot, tail)), "hi": float(np.quantile(boot, 1 - tail))}
