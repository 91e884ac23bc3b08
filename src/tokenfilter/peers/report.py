"""The "Peers" section of ``docs/results.md``: one table per task family and a plot of score against KV held."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tokenfilter.eval.sections import write_section
from tokenfilter.peers.merge import PRESS_NOTES

SECTION = "peers"
FAMILIES = ("needle", "longbench", "ruler")

# Why a press fails where we know it (checked with a full traceback in the peer venv).
FAILURE_CAUSES: dict[str, str] = {
    "PyramidKVPress": (
        "its layers keep different numbers of context entries, and the question's forward after the compression "
        "meets them with one attention mask sized for another layer's cache (sdpa in transformers 5.2.0 under "
        "kvpress 0.5.5's attention patch: `The size of tensor a ... must match the size of tensor b ...`); "
        "a kvpress / transformers incompatibility on this model, not a property of the method"
    ),
}
_RATIO_SUFFIX = re.compile(r"[-_@=]?r?\d*\.?\d+$")


def line_name(summary: Mapping) -> str:
    """The plot line a summary row belongs to: a press by its class; ours by its name less the ratio."""
    if summary["side"] == "kvpress" or summary["method"] == "dense":
        return summary["method"]
    return _RATIO_SUFFIX.sub("", summary["method"]) or summary["method"]


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _order(s: Mapping) -> tuple:
    dense = s["config"] == "dense"
    # per budget: the row of ours that sets it, our other rows at it (the sliding window), then the presses
    return (not dense, s["config"], s["side"] != "ours", s["method"] != s["config"], s["method"])


def _note(s: Mapping) -> str:
    parts = []
    if s["n_failed"]:
        parts.append(f"failed on {s['n_failed']}/{s['n'] + s['n_failed']}: {s['errors'][0]}")
    if s["capped"]:
        parts.append(f"our budget is below the question on {s['capped']} prompt(s): the press holds more")
    if s["side"] == "kvpress" and s["method"] in PRESS_NOTES:
        parts.append(PRESS_NOTES[s["method"]])
    if s["side"] == "ours" and s["config"] != s["method"]:
        lo, hi = s.get("recent") or (None, None)
        window = f"R = {lo}" if lo == hi else f"R = {lo}-{hi}"
        parts.append(f"our sliding-window preset (4 sinks + the {window} most recent tokens, inside the prefill too), "
                     f"sized per prompt to the KV held of {s['config']}")
    return "; ".join(parts).replace("|", "/")


def _delta(press: Mapping, ours: Mapping | None, fmt: str) -> str:
    """The press's score minus ours at the same budget, ± the two standard errors combined."""
    if ours is None or not press["n"] or not ours["n"]:
        return "-"
    d = press["score"] - ours["score"]
    return f"{format(d, '+' + fmt)} ± {format(math.hypot(press['se'], ours['se']), fmt)}"


def _press_budget(family: str, o: Mapping, summaries: Sequence[Mapping]) -> tuple[str | None, list[Mapping]]:
    """The budget (our row) whose presses a row of ours is compared with: its own, else the one holding the KV
    nearest to it (the presses may have been matched to some of our rows only)."""
    presses = [s for s in summaries if s["family"] == family and s["side"] == "kvpress" and s["n"]
               and s["config"] != "dense"]
    configs = {s["config"]: s for s in summaries if s["family"] == family and s["side"] == "ours"}
    if any(p["config"] == o["config"] for p in presses):
        return o["config"], [p for p in presses if p["config"] == o["config"]]
    if not presses:
        return None, []
    near = min({p["config"] for p in presses},
               key=lambda c: abs(configs[c]["kv_share"] - o["kv_share"]) if c in configs else math.inf)
    return near, [p for p in presses if p["config"] == near]


def findings(summaries: Sequence[Mapping]) -> list[str]:
    """Per family and row of ours: the presses that it matches (ours >= press - one se of the press) and those
    that beat it, by how much, at its budget (or, where the presses were not matched to it, at the nearest
    budget they were matched to, with both KV shares said)."""
    out = []
    for family in FAMILIES:
        fmt = ".2f" if family == "needle" else ".1f"
        for o in (s for s in summaries if s["family"] == family and s["side"] == "ours" and s["n"]):
            if o["config"] == "dense":
                continue
            config, presses = _press_budget(family, o, summaries)
            partial = [p["method"] for p in presses if p.get("n_failed")]
            presses = [p for p in presses if not p.get("n_failed")]  # not scored on the same prompts
            if not presses:
                continue
            held = [p["method"] for p in presses if o["score"] >= p["score"] - p["se"]]
            wins = [f"{p['method']} by {format(p['score'] - o['score'], fmt)}" for p in presses
                    if o["score"] < p["score"] - p["se"]]
            line = (f"- {family}, `{o['method']}` ({format(o['score'], fmt)} ± {format(o['se'], fmt)}, "
                    f"{100 * o['kv_share']:.1f}% KV held)")
            if config != o["config"]:
                line += (f", against the presses at the budget of `{config}` "
                         f"({100 * presses[0]['kv_share']:.1f}% KV held; not matched to this row)")
            line += ":"
            if held:
                line += f" at least as good as {', '.join(held)} (within one standard error of the press)"
            if wins:
                line += ("; " if held else " ") + f"behind {', '.join(wins)}"
            if partial:
                line += f" ({', '.join(partial)} failed on some prompts: not compared)"
            out.append(line + ".")
    if any("behind" in line for line in out):
        out.append(WHY_BEHIND)
    return out


WHY_BEHIND = (
    "- Why a press can be ahead at the same KV: every press here compresses after a dense prefill of the whole "
    "context, so it saves no prefill attention (see the FLOP columns), and the scoring presses (SnapKV, TOVA, "
    "Expected Attention, PyramidKV, KeyDiff) choose what to keep with the whole context, and the end of it, in view. "
    "Token Filtering decides online, as each token arrives, before later tokens exist; in exchange it also saves "
    "prefill attention. StreamingLLMPress and our sliding-window preset keep the same entries (the sinks and the "
    "most recent tokens) and differ only in when: ours inside the prefill as well, the press after a dense one; "
    "both find a needle only where it lies inside the window (see the needle per depth)."
)


def failure_lines(summaries: Sequence[Mapping]) -> list[str]:
    """One line per press that failed somewhere: on how many prompts, its first error, and the cause where known."""
    failed: dict[str, list[int]] = {}
    errors: dict[str, str] = {}
    for s in summaries:
        if s["side"] == "kvpress" and s.get("n_failed"):
            n = failed.setdefault(s["method"], [0, 0])
            n[0] += s["n_failed"]
            n[1] += s["n"] + s["n_failed"]
            errors.setdefault(s["method"], s["errors"][0])
    out = []
    for press, (bad, total) in failed.items():
        line = f"- {press} failed on {bad}/{total} prompts: `{errors[press]}`"
        out.append(line + (f"; {FAILURE_CAUSES[press]}." if press in FAILURE_CAUSES else "."))
    return out


def ran_lines(meta: Mapping, summaries: Sequence[Mapping] = ()) -> list[str]:
    """What the table covers and what the command's full grid has that it does not (``meta["ran"]``,
    ``meta["full_grid"]``), the wall time of its invocations and the notes given with ``--note``."""
    ran, full = meta.get("ran") or {}, meta.get("full_grid") or {}
    out = []
    if ran.get("needle_prompts"):
        lengths = ", ".join(str(n) for n in ran["needle_lengths"])
        line = (f"- Needle: {lengths} tokens x {len(ran['needle_depths'])} depths x {ran['needle_facts']} held-out "
                f"facts = {ran['needle_prompts']} prompts.")
        missing = [n for n in full.get("needle_lengths", []) if n not in ran["needle_lengths"]]
        if missing:
            line += f" Not run: {', '.join(str(n) for n in missing)} tokens (the command's default grid has them)."
        out.append(line)
    else:
        out.append("- Needle: not run.")
    if ran.get("longbench_prompts"):
        line = (f"- MiniLongBench: {len(ran['longbench_tasks'])} English tasks x {ran['longbench_limit']} sample(s), "
                f"truncated to {ran['longbench_max_length']} tokens = {ran['longbench_prompts']} prompts.")
        missing = [t for t in full.get("longbench_tasks", []) if t not in ran["longbench_tasks"]]
        if missing:
            line += f" Tasks not run: {', '.join(missing)}."
        out.append(line)
    else:
        out.append("- MiniLongBench: not run.")
    if ran.get("ruler_prompts"):
        lengths = ", ".join(str(n) for n in ran["ruler_lengths"])
        line = (f"- RULER: {len(ran['ruler_tasks'])} synthetic tasks x {lengths} tokens x {ran['ruler_samples']} "
                f"sample(s) = {ran['ruler_prompts']} prompts.")
        missing = [t for t in full.get("ruler_tasks", []) if t not in ran["ruler_tasks"]]
        if missing:
            line += f" Tasks not run: {', '.join(missing)}."
        out.append(line)
    if ran.get("ours"):
        out.append(f"- Ours (`--ours`): dense, {', '.join(ran['ours'])} at ratio(s) "
                   f"{', '.join(format(r, 'g') for r in ran['ratios'])}.")
    if ran.get("presses"):
        out.append(f"- Presses: {', '.join(ran['presses'])}, each matched to the KV held of "
                   f"{', '.join(f'`{b}`' for b in ran['press_budgets'])} (`--press-budgets`); our other rows stand at "
                   "their own KV held, and the findings compare them with the presses at the nearest budget.")
    out += failure_lines(summaries)
    seconds = meta.get("invocations") or []
    if seconds:
        out.append(f"- Wall time: {sum(seconds) / 60:.0f} min over {len(seconds)} invocation(s) of the command "
                   f"({', '.join(f'{s / 60:.0f}' for s in seconds)} min; `--reuse` runs only what is missing).")
    out += [f"- {n}" for n in meta.get("notes") or []]
    return out


def family_table(summaries: Sequence[Mapping], family: str) -> str:
    """Markdown table of one family's summaries (score: needle 0-1, LongBench 0-100)."""
    head = [
        "method", "side", "budget of", "ratio", "score ± se", "n", "KV held (MiB)", "KV held (% dense)",
        "mismatch (% dense)", "prefill attn GFLOP", "decode attn GFLOP", "s / answer", "press - ours", "note",
    ]
    rows = []
    fmt = ".2f" if family == "needle" else ".1f"
    ours = {s["method"]: s for s in summaries if s["family"] == family and s["side"] == "ours"}
    for s in sorted((s for s in summaries if s["family"] == family), key=_order):
        delta = _delta(s, ours.get(s["config"]), fmt) if s["side"] == "kvpress" else ""
        ratio = "n/a (target size)" if s["method"] == "DecodingPress" else _num(s["ratio"], ".3f")
        score = "-" if not s["n"] else f"{_num(s['score'], fmt)} ± {_num(s['se'], fmt)}"
        def v(key: str, scale: float, f: str, s: Mapping = s) -> str:
            return _num(scale * s[key] if s["n"] else None, f)

        rows.append(
            [
                s["method"], s["side"], s["config"], ratio, score, str(s["n"]),
                v("kv_bytes", 2**-20, ".2f"), v("kv_share", 100, ".1f"), v("mismatch_share", 100, "+.2f"),
                v("prefill_flops", 1e-9, ".2f"), v("decode_flops", 1e-9, ".3f"), v("seconds", 1, ".1f"), delta,
                _note(s),
            ]
        )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _needle_breakdown(
    summaries: Sequence[Mapping], key: str, cast: type, head: str, cell: Callable, family: str = "needle"
) -> str:
    """Needle found (or another ``family``'s score) per value of ``summaries[i][key]`` (a dict that JSON keeps with
    string keys, hence ``cast``), one row per (method, budget); ``head`` formats a column's title, ``cell`` its
    entries."""
    rows = sorted((s for s in summaries if s["family"] == family and s.get(key)), key=_order)
    by = [{cast(k): v for k, v in s[key].items()} for s in rows]
    values = sorted({k for b in by for k in b})
    title = ["method", "budget of", *(head.format(k) for k in values)]
    body = [[s["method"], s["config"], *[cell(b.get(k)) for k in values]] for s, b in zip(rows, by, strict=True)]
    lines = ["| " + " | ".join(title) + " |", "|" + "---|" * len(title)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def depth_table(summaries: Sequence[Mapping]) -> str:
    """Needle found per depth (% of the context, 0-1), one row per (method, budget)."""
    return _needle_breakdown(summaries, "by_depth", float, "depth {:g}", lambda v: _num(v, ".2f"))


def length_table(summaries: Sequence[Mapping], family: str = "needle") -> str:
    """Needle found per context length (tokens; 0-1 ± one standard error; RULER: 0-100 over its prompts), one row
    per (method, budget)."""
    fmt = ".2f" if family == "needle" else ".1f"
    return _needle_breakdown(summaries, "by_length", int, "{} tokens",
                             lambda c: "-" if c is None else f"{c['score']:{fmt}} ± {c['se']:{fmt}}", family)


def task_table(summaries: Sequence[Mapping], family: str = "longbench") -> str:
    """LongBench (or RULER) per task (0-100), one row per (method, budget)."""
    lb = sorted((s for s in summaries if s["family"] == family), key=_order)
    tasks = list(dict.fromkeys(t for s in lb for t in s["tasks"]))
    head = ["method", "budget of", *tasks]
    rows = [[s["method"], s["config"], *[_num(s["tasks"].get(t, {}).get("score"), ".1f") for t in tasks]] for s in lb]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def parity_lines(checks: Sequence[Mapping]) -> list[str]:
    """Dense on both sides: how many answers agree, and each one that does not."""
    if not checks:
        return ["- Dense parity was not checked (no dense run on one side)."]
    same = sum(c["same"] for c in checks)
    out = [f"- Dense parity: {same}/{len(checks)} prompts give the same answer in the peer venv as ours."]
    for c in checks:
        if not c["same"]:
            out.append(
                f"  - `{c['prompt']}`: ours {str(c['ours'])[:60]!r}, peer-venv generate {str(c['generate'])[:60]!r}, "
                f"kvpress pipeline {str(c['kvpress'])[:60]!r}: {c['why']}."
            )
    return out


def plot(summaries: Sequence[Mapping], family: str, path: Path) -> Path | None:
    """Score against KV held after the prompt (MiB), one line per method; None when nothing ran."""
    pts = [s for s in summaries if s["family"] == family and s["n"]]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for s in pts:
        lines.setdefault(line_name(s), []).append((s["kv_bytes"] / 2**20, s["score"], s["se"]))
    # Every method is the dense model at ratio 0: its line starts at our dense point.
    dense = lines.get("dense", [])
    span = max(x for xs in lines.values() for x, _, _ in xs)
    ours = {line_name(s) for s in pts if s["side"] == "ours"}
    colors = plt.get_cmap("tab20").colors
    for i, (name, xs) in enumerate(sorted(lines.items())):
        if "dense" in name:
            style: dict = {"marker": "*", "markersize": 12, "linestyle": "none"}
        else:  # ours: solid and thicker, the presses dashed
            xs = xs + dense
            style = {"marker": "o" if name in ours else "s", "markersize": 4, "linewidth": 2 if name in ours else 1,
                     "linestyle": "-" if name in ours else "--"}
        style["color"] = colors[i % len(colors)]
        xs.sort()
        dx = (i - len(lines) / 2) * 0.004 * span  # a small offset per method, so that equal budgets stay visible
        ax.errorbar([x + dx for x, _, _ in xs], [y for _, y, _ in xs], yerr=[e for _, _, e in xs], label=name,
                    capsize=2, **style)
    ax.set_xlabel("KV held after the prompt (MiB, all layers)")
    ax.set_ylabel({"needle": "needle found (0-1)", "longbench": "LongBench average (0-100)"}.get(
        family, "RULER average (0-100)"))
    ax.set_title(f"Peers at equal KV held: {family}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def section_markdown(
    summaries: Sequence[Mapping], checks: Sequence[Mapping], meta: Mapping, images: Sequence[str]
) -> str:
    """The section body. ``meta``: command, model, versions (peer side), setup_seconds, budget_source, presses."""
    versions = meta.get("versions") or {}
    setup = meta.get("setup_seconds")
    lines = [
        "## Peers: kvpress presses at equal KV held",
        "",
        f"Generated by `{meta.get('command', 'tokenfilter peers')}` on {meta.get('model', 'the model')}. The presses "
        f"run through NVIDIA kvpress's own pipeline ({', '.join(f'{k} {v}' for k, v in versions.items())}) in a venv "
        "of their own" + (f" (built in {setup:.0f} s)" if setup else "") + ", on the same token ids as ours: each "
        "prompt is split into the context (which a press compresses after a dense prefill) and the question with "
        "the answer prefix (prefilled after the compression, kept whole). Our rows (`--ours`) run here with our "
        "transformers; `sliding-window` is our `TokenFilter.sliding_window` preset (StreamingLLM's rule, 4 sinks + a "
        "recent window, applied inside the prefill as well), sized per prompt to hold the KV that the KV-side row it "
        "stands beside measured on that prompt; kvpress's `StreamingLLMPress` applies the same rule once, after a "
        "dense prefill.",
        "",
        "Each press runs at the `compression_ratio` (the fraction of the context removed) that holds, after the "
        "prompt, the KV that the Token Filtering row in `budget of` holds on that prompt (SPEC \"KV held\", all "
        f"layers); our KV held is {meta.get('budget_source', 'measured')}. `mismatch` is the press's KV held minus "
        "ours, left by rounding to whole tokens. Attention FLOPs: (query, key) pairs x 4·heads·head_dim; a press "
        "prefills densely, so it saves no prefill attention; decode counts every new token against everything held. "
        "Seconds: the whole answer (prefill, compression, decode) on this machine's CPU, shared with other work, "
        f"{meta.get('threads', 1)} thread(s) on both sides. On the few-shot LongBench tasks ours stops at the end of "
        "the first line while kvpress's pipeline decodes to the cap (both are scored on the first line), so there "
        "the presses' decode FLOPs and seconds are higher for that reason alone. Needle scores are 0-1, "
        "LongBench scores 0-100 (average over the tasks), RULER scores 0-100 (RULER's string match: the share of the "
        "reference strings in the answer, averaged over the tasks); ± is one standard error.",
        "",
    ]
    lines += ["### What ran", "", *ran_lines(meta, summaries), ""]
    titles = {"needle": "Needle in a haystack", "longbench": "MiniLongBench", "ruler": "RULER (synthetic tasks)"}
    for family, title in titles.items():
        if not any(s["family"] == family for s in summaries):
            continue
        lines += [f"### {title}", "", family_table(summaries, family), ""]
        if family in ("longbench", "ruler"):
            lines += ["Per task:", "", task_table(summaries, family), ""]
            if family == "ruler" and any(len(x.get("by_length") or {}) > 1 for x in summaries if x["family"] == family):
                lines += ["Per context length:", "", length_table(summaries, family), ""]
        else:
            needle = [x for x in summaries if x["family"] == "needle"]
            if any(len(x.get("by_length") or {}) > 1 for x in needle):
                lines += ["Per context length:", "", length_table(summaries), ""]
            if any(x.get("by_depth") for x in needle):
                lines += ["Per depth (where the needle sits, % of the context):", "", depth_table(summaries), ""]
        lines += [f"![peers {family}]({img})" for img in images if family in Path(img).stem] + [""]
    found = findings(summaries)
    if found:
        lines += ["### Ours against the presses at equal KV held", "", *found, ""]
    lines += ["### Dense parity (no press, transformers versions side by side)", "", *parity_lines(checks), ""]
    return "\n".join(lines) + "\n"


def write_results_section(
    summaries: Sequence[Mapping], checks: Sequence[Mapping], meta: Mapping, results_md: Path
) -> list[Path]:
    """Write (or replace) the ``peers`` section of ``results_md``, other sections kept; plots in ``peers/``."""
    results_md = Path(results_md)
    images, written = [], []
    for family in FAMILIES:
        png = plot(summaries, family, results_md.parent / "peers" / f"peers_{family}.png")
        if png is not None:
            images.append(f"peers/{png.name}")
            written.append(png)
    write_section(results_md, SECTION, section_markdown(summaries, checks, meta, images))
    return [results_md, *written]
