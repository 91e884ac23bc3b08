"""The study's report: Markdown tables, the verdict computed from the numbers, and the Pareto plot
(perplexity and accuracy vs FLOPs saved, per method)."""

from __future__ import annotations

import math
from pathlib import Path

from tokenfilter.study import variants
from tokenfilter.study.curves import matched_log_ppl


def _f(x: float | None, spec: str = ".1f") -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return format(x, spec)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def _ratios(result: dict) -> list[str]:
    return [str(r) for r in result["config"]["ratios"]]


def layers_section(result: dict) -> list[str]:
    probe = result["layers"]
    out = [f"### Per-layer sensitivity (one layer at {probe['ratio']:.0%}, selection windows, dense PPL "
           f"{probe['dense_ppl']:.2f})", "",
           "Increase in log-perplexity when only that layer filters: similarity-chosen vs random tokens.", ""]
    rows = [[str(r["layer"]), f"{r['similarity_dlogppl']:+.3f}", f"{r['random_dlogppl']:+.3f}",
             f"{r['similarity_dlogppl'] - r['random_dlogppl']:+.3f}"] for r in probe["rows"]]
    out += _table(["layer", "Δlog PPL similarity", "Δlog PPL random", "similarity − random"], rows)
    worse = [r["layer"] for r in probe["rows"] if r["similarity_dlogppl"] > r["random_dlogppl"]]
    top = sorted(probe["rows"], key=lambda r: -r["similarity_dlogppl"])[:3]
    out.append(f"Most sensitive layers: {', '.join(str(r['layer']) for r in top)}. Similarity is worse than random "
               f"at {len(worse)} of {len(probe['rows'])} layers.")
    return [*out, ""]


def select_section(result: dict) -> list[str]:
    sel, ratios = result["select"], _ratios(result)
    choice = sel["choice"]
    out = [f"### Selection half (even WikiText-2 test windows; dense PPL {sel['dense']['ppl']:.2f})", "",
           "PPL at each target ratio, with the fraction of total FLOPs saved in brackets; the last column is the "
           "mean log-PPL interpolated at the FLOPs the paper default saves (lower is better; ∞ = cannot save "
           "that much).", ""]
    rows = []
    for name, runs in sel["runs"].items():
        cells = [f"{runs[r]['ppl']:.1f} ({_pct(runs[r]['flops_saved'])})" for r in ratios]
        rows.append([name, *cells, _f(choice["score"].get(name), ".3f")])
    out += _table(["candidate", *(f"ratio {r}" for r in ratios), "matched-FLOPs log PPL"], rows)
    out.append(f"**Chosen: `{choice['chosen']}`** ({choice['rule']}; `{variants.PAPER}` scores "
               f"{choice['score'][variants.PAPER]:.3f}).")
    return [*out, ""]


def _interp_shortgpt(curve: list[dict], key: str, flops: float, dense: float) -> float | None:
    """Layer removal's PPL at ``flops`` saved, log-linear between its points (dense at 0); None beyond them."""
    points = [{"flops_saved": c["flops_saved"], "ppl": c["ppl"][key]} for c in curve]
    log_ppl = matched_log_ppl(points, dense, [flops])[0]
    return None if math.isinf(log_ppl) else math.exp(log_ppl)


def _ppl_rows(block: dict, key: str, ratios: list[str], chosen: str) -> list[list[str]]:
    rows = [["dense", *([_f(block["dense"][key], ".2f")] * len(ratios))]]
    for label, runs in block["runs"].items():
        rows.append([label, *(f"{runs[r]['ppl'][key]:.1f} ({_pct(runs[r]['flops_saved'])})" for r in ratios)])
    chosen_runs = block["runs"][chosen]
    cells = []
    for r in ratios:
        v = _interp_shortgpt(block["shortgpt"], key, chosen_runs[r]["flops_saved"], block["dense"][key])
        cells.append(f"{_f(v)} ({_pct(chosen_runs[r]['flops_saved'])})")
    rows.append(["layer removal at the same FLOPs (interpolated)", *cells])
    return rows


def heldout_section(result: dict, block_key: str = "heldout", title: str | None = None) -> list[str]:
    block, ratios = result[block_key], _ratios(result)
    keys = list(block["dense"])
    out = []
    for key in keys:
        out += [f"### {title or 'Held-out perplexity'}: {key}", "",
                "PPL (fraction of FLOPs saved). `#sN` = random seed N.", ""]
        out += _table(["method", *(f"ratio {r}" for r in ratios)], _ppl_rows(block, key, ratios, result["chosen"]))
    curve = block["shortgpt"]
    out += ["Layer removal (ShortGPT, Block Influence on held-apart essays): "
            + ", ".join(f"{c['layers_removed']} layers {_pct(c['flops_saved'])} → "
                        + "/".join(_f(v) for v in c["ppl"].values()) for c in curve), ""]
    return out


def accuracy_section(result: dict) -> list[str]:
    acc, ratios = result["accuracy"], _ratios(result)
    out = [f"### Held-out accuracy ({acc['docs_per_task']} odd-numbered documents per task: "
           f"{', '.join(acc['tasks'])}; dense average {acc['dense']['avg']:.3f})", ""]
    rows = [["dense", *([f"{acc['dense']['avg']:.3f}"] * len(ratios))]]
    for label, runs in acc["runs"].items():
        rows.append([label, *(f"{runs[r]['avg']:.3f} ({_pct(runs[r]['flops_saved'])})" for r in ratios)])
    out += _table(["method", *(f"ratio {r}" for r in ratios)], rows)
    out += [f"Chosen (`{result['chosen']}`) minus the random floor and minus layer removal at the same FLOPs, "
            "paired bootstrap 95% interval over documents (task-stratified):", ""]
    rows = []
    for r in ratios:
        s = acc["summary"][r]
        vs_r = "; ".join(f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]" for d in s["vs_random"])
        d = s["vs_shortgpt"]
        rows.append([r, _f(s["random_spread"], ".3f"), vs_r, f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"])
    out += _table(["ratio", "random seed spread", "chosen − random (per seed)", "chosen − layer removal"], rows)
    return out


def verdict(result: dict) -> list[str]:
    """Plain statements computed from the measurements (the issue's 'done' test)."""
    out = ["### Verdict (computed from the tables above)", ""]
    chosen = result["chosen"]
    if "accuracy" in result:
        for r, s in result["accuracy"]["summary"].items():
            margin = s["chosen"] - (s["random_mean"] or 0)
            spread = s["random_spread"] or 0
            beats_random = margin > spread and all(d["lo"] > 0 for d in s["vs_random"])
            beats_lr = s["vs_shortgpt"]["lo"] > 0
            out.append(f"- ratio {r}: accuracy {s['chosen']:.3f} vs random {s['random_mean']:.3f} (margin "
                       f"{margin:+.3f}, seed spread {spread:.3f}): {'beats' if beats_random else 'does NOT beat'} "
                       f"random beyond noise; vs layer removal {s['shortgpt']:.3f}: "
                       f"{'beats it' if beats_lr else 'does NOT beat it'} (interval excludes 0: {beats_lr}).")
    for block_key, model_name in (("heldout", result["model"]), ("second", "stories260K")):
        block = result.get(block_key)
        if not block or "runs" not in block:
            continue
        for key in block["dense"]:
            for r in _ratios(result):
                mine = block["runs"][chosen][r]
                rnd = [v[r]["ppl"][key] for k, v in block["runs"].items() if k.startswith(f"random@{chosen}#")]
                lr = _interp_shortgpt(block["shortgpt"], key, mine["flops_saved"], block["dense"][key])
                p = mine["ppl"][key]
                beats = p < min(rnd) and (min(rnd) - p) > (max(rnd) - min(rnd))
                lr_text = "no layer-removal point" if lr is None else (
                    f"layer removal at equal FLOPs {lr:.1f}: {'better' if p < lr else 'WORSE'} than it")
                vs_random = "beats every seed by more than their spread" if beats else "does NOT clearly beat random"
                out.append(f"- {model_name} {key}, ratio {r}: PPL {p:.1f} vs random {min(rnd):.1f}–{max(rnd):.1f} "
                           f"({vs_random}); {lr_text}.")
    return [*out, ""]


def render(result: dict, command: str | None = None) -> str:
    lines = ["# Quality study: what makes Token Filtering hold", ""]
    if command:
        lines += [f"Generated by `{command}` on {result['model']} "
                  f"({result['seconds'] / 60:.0f} min, {result['threads']} CPU threads).", ""]
    if "layers" in result:
        lines += layers_section(result)
    if "select" in result:
        lines += select_section(result)
    if "heldout" in result:
        lines += heldout_section(result)
    if "accuracy" in result:
        lines += accuracy_section(result)
    if "second" in result and "runs" in result["second"]:
        lines += heldout_section(result, "second", "Second real model (stories260K), text sampled from it")
    lines += verdict(result)
    lines += ["![Pareto: perplexity and accuracy vs FLOPs saved](study.png)", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("heldout", k) for k in result.get("heldout", {}).get("dense", {})]
    panels += [("second", k) for k in result.get("second", {}).get("dense", {})]
    has_acc = "accuracy" in result
    n = len(panels) + has_acc
    fig, axes = plt.subplots(1, max(n, 1), figsize=(5 * max(n, 1), 4), squeeze=False)
    for ax, (block_key, key) in zip(axes[0], panels, strict=False):
        block = result[block_key]
        for label, runs in block["runs"].items():
            xs = [0.0] + [runs[r]["flops_saved"] for r in _ratios(result)]
            ys = [block["dense"][key]] + [runs[r]["ppl"][key] for r in _ratios(result)]
            ax.plot(xs, ys, "o-" if not label.startswith("random") else "x--", label=label, alpha=0.85)
        xs = [0.0] + [c["flops_saved"] for c in block["shortgpt"]]
        ys = [block["dense"][key]] + [c["ppl"][key] for c in block["shortgpt"]]
        ax.plot(xs, ys, "s-", color="black", label="layer removal")
        ax.set_yscale("log")
        ax.set_xlabel("fraction of FLOPs saved")
        ax.set_ylabel(f"perplexity ({key})")
        ax.set_title(f"{'stories260K' if block_key == 'second' else result['model']}: {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if has_acc:
        ax = axes[0][-1]
        acc = result["accuracy"]
        for label, runs in acc["runs"].items():
            pts = sorted((runs[r]["flops_saved"], runs[r]["avg"]) for r in _ratios(result))
            xs, ys = [0.0] + [p[0] for p in pts], [acc["dense"]["avg"]] + [p[1] for p in pts]
            style = "s-" if label == "shortgpt" else ("x--" if label.startswith("random") else "o-")
            ax.plot(xs, ys, style, label=label, alpha=0.85)
        ax.set_xlabel("fraction of FLOPs saved")
        ax.set_ylabel("average accuracy (held-out documents)")
        ax.set_title("zero-shot suite + MMLU")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def defaults_section(result: dict, study_md: str, command: str) -> str:
    """The short "how we chose the defaults" section of ``docs/results.md``."""
    choice = result.get("select", {}).get("choice")
    lines = ["## How we chose the defaults", "",
             f"Generated by `{command}`; the full study (per-layer sensitivity, every candidate, held-out tables, "
             f"Pareto plot) is in [{study_md}]({study_md}).", ""]
    if choice:
        lines += [f"Candidates were ranked on the selection half only (even WikiText-2 test windows) by "
                  f"{choice['rule']}; the winner was `{result['chosen']}` "
                  f"({variants.kwargs_of(result['chosen']) or 'the SPEC default'}). Everything below is measured on "
                  "data the choice never saw.", ""]
    held = result.get("heldout")
    if held and variants.PAPER in held["runs"] and result["chosen"] != variants.PAPER:
        mine, paper = held["runs"][result["chosen"]], held["runs"][variants.PAPER]
        for key in held["dense"]:
            pairs = ", ".join(f"{r}: {mine[r]['ppl'][key]:.1f} vs {paper[r]['ppl'][key]:.1f}" for r in _ratios(result))
            lines.append(f"- Held-out {key} PPL, `{result['chosen']}` vs the paper's schedule, by ratio: {pairs} "
                         f"(dense {held['dense'][key]:.1f}).")
    lines += verdict(result)[2:]
    lines.append("Layer removal at equal FLOPs is interpolated log-linearly between whole-layer points (dense at 0), "
                 "which flatters it on stories260K where one layer is already 18% of the FLOPs.")
    return "\n".join(lines)


def write_all(result: dict, out_dir: Path, docs_md: Path | None, results_md: Path | None) -> list[Path]:
    """study.json's report: ``out_dir``/study.{md,png}, optionally ``docs_md`` (+ its PNG) and the
    "how we chose the defaults" section of ``results_md``."""
    import os
    import shutil

    from tokenfilter.eval.sections import write_keeping_sections, write_section

    command = " && ".join(result.get("commands", []))
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(result, out_dir / "study.png")
    text = render(result, command or None)
    (out_dir / "study.md").write_text(text, encoding="utf-8")
    written = [out_dir / "study.png", out_dir / "study.md"]
    if docs_md:
        docs_md.parent.mkdir(parents=True, exist_ok=True)
        write_keeping_sections(docs_md, text)  # the KV-side study's section (study --kv-side) stays
        shutil.copyfile(out_dir / "study.png", docs_md.parent / "study.png")
        written += [docs_md, docs_md.parent / "study.png"]
    if results_md:
        link = os.path.relpath(docs_md or out_dir / "study.md", results_md.parent)
        write_section(results_md, "study", defaults_section(result, link, command))
        written.append(results_md)
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m tokenfilter.study.report results/study/study.json [--write-docs docs/study.md]
    [--results-md docs/results.md]``: re-render the report from the JSON without re-running anything."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m tokenfilter.study.report", description=main.__doc__)
    parser.add_argument("results", type=Path)
    parser.add_argument("--write-docs", type=Path, default=None)
    parser.add_argument("--results-md", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        result = json.loads(args.results.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        print(f"error: cannot read {args.results}: {exc}")
        return 2
    written = write_all(result, args.results.parent, args.write_docs, args.results_md)
    print("wrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
