"""Needle-in-a-haystack heat maps: depth (rows) x context length (columns), one PNG per method."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path


def safe_name(name: str) -> str:
    """A file-name-safe version of a method name (``"ratio=0.25"`` -> ``"ratio_0.25"``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "method"


def needle_heatmap(
    grid: Mapping[int, Mapping[float, float]],
    lengths: Sequence[int],
    depths: Sequence[float],
    path: str | Path,
    title: str = "",
) -> Path:
    """Save ``grid[length][depth]`` (score in [0, 1], missing = blank) as a heat map PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.full((len(depths), len(lengths)), np.nan)
    for j, length in enumerate(lengths):
        for i, depth in enumerate(depths):
            value = grid.get(length, {}).get(depth)
            if value is not None:
                data[i, j] = value
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.55 * len(depths) + 1.8))
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not np.isnan(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.2g}", ha="center", va="center", fontsize=8)
    mean = np.nanmean(data) if np.isfinite(data).any() else float("nan")
    ax.set_title(f"{title}  (mean {mean:.2f})" if title else f"mean {mean:.2f}", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
