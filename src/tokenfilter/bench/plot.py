"""PNG of the speed ratio (dense time / method time) vs context length, per ratio, with the FLOP-model ideal."""

from __future__ import annotations

from pathlib import Path


def plot_speedup(result: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    cells = result["cells"]
    batches = sorted({c["batch"] for c in cells}) or [1]
    labels, overhead = [], {c["label"] for c in cells if c["method"] == "overhead"}  # (nothing filtered: grey)
    for c in cells:
        if c["method"] != "dense" and c["label"] not in labels:
            labels.append(c["label"])
    fig, axes = plt.subplots(len(batches), 2, figsize=(11, 3.8 * len(batches)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, b in enumerate(batches):
        for col, phase in enumerate(("prefill", "decode")):
            ax = axes[row][col]
            for k, label in enumerate(labels):
                pts = sorted(
                    (c["length"], c[phase]["speedup"], c[phase]["ideal"])
                    for c in cells
                    if c["batch"] == b and c["label"] == label and c[phase]["speedup"] is not None
                )
                if not pts:
                    continue
                xs = [p[0] for p in pts]
                color = "0.35" if label in overhead else colors[k % len(colors)]
                ax.plot(xs, [p[1] for p in pts], "o-", color=color, label=f"{label} measured")
                if label not in overhead:
                    ax.plot(xs, [p[2] for p in pts], "--", color=color, alpha=0.8, label=f"{label} ideal (FLOPs)")
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xscale("log", base=2)
            lengths = sorted({c["length"] for c in cells if c["batch"] == b})
            if lengths:
                ax.set_xticks(lengths)
                ax.set_xticklabels([str(x) for x in lengths])
            title = "prefill (time to first token)" if phase == "prefill" else "decode (tokens/s)"
            ax.set_title(f"{title}, batch {b}")
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("speed ratio vs dense (dense time / time)")
            ax.grid(True, alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=7, loc="best")
    model = result.get("model", {}).get("name", "")
    fig.suptitle(f"Token Filtering speed vs dense: {model}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
