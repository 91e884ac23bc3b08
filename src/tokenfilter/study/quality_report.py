"""Markdown for the KV-side quality study (``study.quality``): tables and verdicts computed from its JSON."""

from __future__ import annotations

from tokenfilter.study.quality import CANDIDATES, choose, choose_ladder, needle_summary, ppl_target


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def _ppl_cells(row: dict, dense: float) -> list[str]:
    return [f"{row['ppl']:.2f}", f"{row['ppl'] / dense:.3f}", f"{row['kv_held']:.3f}", f"{row['pairs']:.3f}"]


def select_section(sel: dict, ratio: float, model: str | None = None) -> list[str]:
    dense = sel["dense"]["ppl"]
    # a run stopped mid-selection saved its rows but not its choice: the same rule over what it measured
    choice = sel.get("choice") or choose(sel, ratio, [n for n in sel["runs"] if n in CANDIDATES], model)
    forced = sel["dense"]["needle"].get("scoring") == "teacher-forced"
    named = f": {model}" if model else ""
    out = [f"### Selection half{named} (even WikiText-2 windows, selection needle facts and depths), ratio {ratio}", "",
           f"Dense PPL {dense:.2f}. KV held and pairs are shares of dense over all layers after each window."
           + (" Needle answers teacher-forced: found = every answer token is the argmax (what greedy decoding "
              "writes), log p = the answer's log-probability, kept = share of the needle's (token, layer) entries "
              "kept in the layers that filter." if forced else ""), ""]
    rows = []
    for name, r in {"dense": sel["dense"], **sel["runs"]}.items():
        mark = " (chosen)" if name == choice["chosen"] else ""
        nd = r["needle"]
        extra = [f"{nd['logp']:.2f}", f"{nd['needle_kept']:.2f}"] if forced else []
        within = "" if name == "dense" else ("yes" if name in choice["within_target"] else "no")
        rows.append([name + mark, *_ppl_cells(r, dense), f"{nd['found']:.2f}", *extra, within])
    head = ["candidate", "PPL", "x dense", "KV held", "pairs", "needle found",
            *(["log p", "kept"] if forced else []), "within target"]
    out += _table(head, rows)
    out.append(f"Rule: {choice['rule']}.")
    return [*out, ""]


def found_over(needle: dict, lengths: list[str]) -> float | None:
    """Share of prompts found over ``lengths`` (those the method has); None when it has none of them."""
    summary = needle_summary({n: needle["by_length"][n] for n in lengths if n in needle["by_length"]})
    return summary["found"] if summary["cells"] else None


def _span(lengths: list[str]) -> str:
    return lengths[0] if len(lengths) == 1 else f"{lengths[0]}-{lengths[-1]}"


WINDOWS = {"sliding_window": "sliding window, equal KV", "sliding_window_pairs": "sliding window, equal pairs"}
NEEDLE_RATIO = 0.5  # issue 15's needle targets against dense and the sliding window are at this ratio


def heldout_section(held: dict, model: str) -> list[str]:
    dense = held["dense"]["ppl"]
    dtype = held.get("settings", {}).get("dtype", "float32")
    weights = "" if dtype == "float32" else f", {dtype}"
    out = [f"### Held-out half: {model} (odd WikiText-2 windows, held-out needle facts and depths{weights})", "",
           f"Chosen: `{held['chosen']}`. Dense PPL {dense:.2f}. Random: mean over seeds (min-max). Sliding windows: "
           "sinks + recent window sized on the same input to hold the same KV as the chosen configuration (equal "
           "KV), or to compute the same share of attention pairs (equal pairs).", ""]
    rows = []
    for ratio, runs in held["runs"].items():  # a run stopped mid-ratio lacks some rows: they are left out
        if "chosen" not in runs:
            continue
        rows.append([ratio, "chosen", *_ppl_cells(runs["chosen"], dense)])
        rnd = [r["ppl"] for r in runs.get("random", [])]
        if rnd:
            mean = sum(rnd) / len(rnd)
            rows.append([ratio, f"random x{len(rnd)}", f"{mean:.2f} ({min(rnd):.2f}-{max(rnd):.2f})",
                         f"{mean / dense:.3f}", f"{runs['random'][0]['kv_held']:.3f}",
                         f"{runs['random'][0]['pairs']:.3f}"])
        rows += [[ratio, label, *_ppl_cells(runs[key], dense)] for key, label in WINDOWS.items() if key in runs]
        if "paper" in runs:
            rows.append([ratio, "paper", *_ppl_cells(runs["paper"], dense)])
    out += _table(["ratio", "method", "PPL", "x dense", "KV held", "pairs"], rows)
    needle = [(ratio, runs) for ratio, runs in held["runs"].items() if "needle" in runs.get("chosen", {})]
    if "needle" in held["dense"] and needle:
        out += _needle_table(held["dense"]["needle"], needle)
    out += verdicts(held, model)
    return [*out, ""]


def _length_cell(entry: dict) -> str:
    pairs = f", pairs {entry['pairs']:.2f}" if "pairs" in entry else ""
    return f"{entry['found']:.2f} (KV {entry['kv_held']:.2f}{pairs})"


def _needle_table(dense: dict, needle: list[tuple[str, dict]]) -> list[str]:
    lengths = list(dense["by_length"])
    head = ["ratio", "method", "found", "x dense",
            *(f"{dense['by_length'][n].get('tokens', n)} tokens" for n in lengths)]  # as clipped to the model

    def cells(nd: dict) -> list[str]:
        have = [n for n in lengths if n in nd["by_length"]]
        found = found_over(nd, have)
        base = found_over(dense, have)
        span = "" if have == lengths else f" ({_span(have)})"
        per = [_length_cell(nd["by_length"][n]) if n in nd["by_length"] else "not measured" for n in lengths]
        return [f"{found:.2f}{span}", f"{found / base:.2f}" if base else "–", *per]

    def row(ratio: str, name: str, run: dict) -> list[str]:
        if "needle" not in run:  # a run stopped before this measurement
            return [ratio, name, "not measured", "–", *("–" for _ in lengths)]
        return [ratio, name, *cells(run["needle"])]

    rows = [["–", "dense", *cells(dense)]]
    for ratio, runs in needle:
        rows.append(row(ratio, "chosen", runs["chosen"]))
        rows += [row(ratio, label, runs[key]) for key, label in WINDOWS.items()  # at other ratios: twins only
                 if key in runs and (float(ratio) == NEEDLE_RATIO or "needle" in runs[key])]
        rows += [row(ratio, f"random seed {s}", r) for s, r in enumerate(runs.get("random", []))]
    per_length = dense["by_length"][lengths[0]].get("cells")
    size = (f"{per_length} prompts per length and method; one prompt = {1 / per_length:.3f}" if per_length
            else f"{dense['cells']} prompts per method")
    return ["", f"Needle in a haystack, held-out facts ({size}):", "", *_table(head, rows)]


def verdicts(held: dict, model: str) -> list[str]:
    """The issue's targets, each checked on the numbers above."""
    dense = held["dense"]["ppl"]
    out = ["Targets (issue 15), computed:", ""]
    for ratio, runs in held["runs"].items():
        if "chosen" not in runs:
            continue
        x = runs["chosen"]["ppl"] / dense
        target = ppl_target(model, float(ratio), default=None)
        if target:
            verdict = "met" if x <= target else "MISSED"
            out.append(f"- ratio {ratio}: PPL x{x:.3f} dense, target <= x{target}: {verdict}.")
        rnd = [r["ppl"] for r in runs.get("random", [])]
        if len(rnd) < 2:
            out.append(f"- ratio {ratio}: PPL against its random twin: not measured over seeds.")
        else:
            gap = min(rnd) - runs["chosen"]["ppl"]
            spread = max(rnd) - min(rnd)
            out.append(f"- ratio {ratio}: beats its random twin on PPL by {gap:.2f} against a seed range of "
                       f"{spread:.2f}: {'met' if gap > spread else 'MISSED'}.")
        if "needle" in runs["chosen"] and "needle" in held["dense"]:
            out += _needle_verdicts(ratio, runs, held["dense"]["needle"])
        else:
            out.append(f"- ratio {ratio}: needle against its random twin: not measured.")
    return [*out, ""]


def _needle_verdicts(ratio: str, runs: dict, dense: dict) -> list[str]:
    """Each comparison over the lengths both sides measured (named when not all of the chosen's). The share of
    dense and the sliding windows are targets at ``NEEDLE_RATIO`` only; the random twin at every ratio."""
    chosen = runs["chosen"]["needle"]
    mine = [n for n in dense["by_length"] if n in chosen["by_length"]]
    found, base = found_over(chosen, mine), found_over(dense, mine)
    share = found / base if base else float("nan")
    head = f"- ratio {ratio}: needle ({_span(mine)} tokens) {found:.2f} = {share:.2f} of dense ({base:.2f})"
    if float(ratio) != NEEDLE_RATIO:
        return [f"{head} (no target at this ratio).", *_twin_verdict(ratio, runs, chosen, mine)]
    out = [f"{head}, target >= 0.80: {'met' if share >= 0.8 else 'MISSED'}."]

    def common(other: dict) -> tuple[float, float, str]:
        both = [n for n in mine if n in other["by_length"]]
        span = "" if both == mine else f" over {_span(both)} tokens"
        return found_over(chosen, both), found_over(other, both), span

    for key, label in (("sliding_window", "equal KV"), ("sliding_window_pairs", "equal pairs")):
        if "needle" in runs.get(key, {}):
            ours, sw, span = common(runs[key]["needle"])
            out.append(f"- ratio {ratio}: needle against the sliding window at {label}{span}: {ours:.2f} against "
                       f"{sw:.2f}: {'more' if ours > sw else 'NOT more'}.")
        elif key == "sliding_window":
            out.append(f"- ratio {ratio}: needle against the sliding window at equal KV: not measured.")
    return [*out, *_twin_verdict(ratio, runs, chosen, mine)]


def _twin_verdict(ratio: str, runs: dict, chosen: dict, mine: list[str]) -> list[str]:
    rnd = [r["needle"] for r in runs.get("random", []) if "needle" in r]
    if len(rnd) < 2:
        return [f"- ratio {ratio}: needle against its random twin: not measured over seeds."]
    both = [n for n in mine if all(n in r["by_length"] for r in rnd)]
    ours = found_over(chosen, both)
    vals = [found_over(r, both) for r in rnd]
    spread = max(vals) - min(vals)
    span = "" if both == mine else f" over {_span(both)} tokens"
    return [f"- ratio {ratio}: needle against its random twin{span} ({ours:.2f} against "
            f"{', '.join(f'{v:.2f}' for v in vals)}; range {spread:.2f}): "
            f"{'beaten by more than the range' if ours - max(vals) > spread else 'MISSED'}."]


def _missing(res: dict) -> list[str]:
    """What a run asked for and did not measure (a stopped or reduced run), said plainly."""
    out = []
    if "select" not in res:
        out.append("the selection half did not run: the candidate was named (`--chosen`), not chosen by the study")
    else:
        chosen = res["select"].get("choice", {}).get("chosen")
        held = res.get("heldout", {}).get("chosen")
        if held and chosen and held != chosen:
            out.append(f"the held-out half reports `{held}`, not the selection's choice `{chosen}`")
        lengths = res["select"].get("settings", {}).get("lengths")
        if lengths:
            out.append(f"the selection needle ran at {', '.join(map(str, lengths))} tokens only")
    asked = [str(r) for r in res.get("config", {}).get("ratios", [])]
    runs = res.get("heldout", {}).get("runs", {})
    if [r for r in asked if r not in runs]:
        out.append(f"held-out ratios asked but not measured: {', '.join(r for r in asked if r not in runs)}")
    seeds = res.get("config", {}).get("seeds", 0)
    for ratio, rows in runs.items():
        lacking = [k for k in ("chosen", *WINDOWS, "paper") if k not in rows]
        lacking += ["random twin"] if len(rows.get("random", [])) < seeds else []
        if lacking:
            out.append(f"held-out ratio {ratio} measured in part (not: {', '.join(lacking)})")
    if not res.get("config", {}).get("needle_lengths"):
        out.append("no needle")
    return out


def ladder_section(result: dict) -> list[str]:
    """The rule over every model with a selection half (``choose_ladder``): a table of each candidate on each
    model, and the choice, or the plain statement that no candidate meets every model's target. Empty when fewer
    than two models have a selection half."""
    selects = {m: r["select"] for m, r in result.get("models", {}).items() if "select" in r}
    ratios = {r["config"]["budget_ratio"] for m, r in result.get("models", {}).items() if "select" in r}
    if len(selects) < 2 or len(ratios) != 1:
        return []
    try:
        lad = choose_ladder(selects, ratios.pop())
    except ValueError:
        return []
    models = lad["models"]
    targets = ", ".join(f"{m}: x{lad['table'][lad['closest']][m]['target']}" for m in models)
    out = ["### The ladder: one rule over every model's selection half", "",
           "Each cell: perplexity x dense / selection needle found (teacher-forced). A cell in **bold** is within that "
           f"model's perplexity target ({targets}); – where the model did not measure the candidate (the rule reads "
           "the candidates every model measured). The random twin (seed 0) of a candidate, where two or more "
           "models measured it, is the chance floor beside it.", ""]
    rows = []
    for name, by_model in lad["table"].items():
        cells = []
        for m in models:
            c = by_model[m]
            text = "–" if c is None else f"x{c['x_dense']:.3f} / {c['found']:.2f}"
            cells.append(f"**{text}**" if c and c["ok"] else text)
        ruled = name in lad["ruled"]
        worst = f"{min(c['found'] for c in by_model.values()):.2f}" if ruled else ""
        mark = " (chosen)" if name == lad["chosen"] else (" (closest)" if name == lad["closest"] else "")
        within = ("yes" if name in lad["within_target"] else "no") if ruled else ""
        rows.append([name + mark, *cells, within, worst])
    for name in CANDIDATES:  # the twins, as the floor
        twin = name + "-random"
        if sum(twin in sel["runs"] for sel in selects.values()) >= 2:
            cells = []
            for m in models:
                run, dense = selects[m]["runs"].get(twin), selects[m]["dense"]["ppl"]
                cells.append("–" if run is None else f"x{run['ppl'] / dense:.3f} / {run['needle']['found']:.2f}")
            rows.append([twin, *cells, "", ""])
    out += _table(["candidate", *models, "within every target", "worst-case needle"], rows)
    out.append(f"Rule: {lad['rule']}.")
    if lad["chosen"]:
        out.append(f"Chosen over the ladder: `{lad['chosen']}`.")
    else:
        out.append(f"**No candidate meets every model's target**; the closest on perplexity alone (the smallest "
                   f"worst-case ratio to a model's target) is `{lad['closest']}`.")
    return [*out, ""]


def render(result: dict) -> str:
    parts = ["## KV-side study (Quality II)", "",
             f"{result.get('seconds', 0) / 60:.0f} min, torch {result.get('torch')}, {result.get('threads')} threads. "
             "Generated by:", "", *(f"- {c}" for c in result.get("commands", ["tokenfilter study --kv-side"])), ""]
    if result.get("notes"):  # what the tables alone do not say (e.g. why the held-out half reports its candidate)
        parts += ["Notes:", "", *(f"- {n}" for n in result["notes"]), ""]
    for model, res in result.get("models", {}).items():
        missing = _missing(res)
        if missing:
            parts += [f"Not measured on {model}: {'; '.join(missing)}.", ""]
        if "select" in res:
            parts += select_section(res["select"], res["config"]["budget_ratio"], model)
        if "heldout" in res:
            parts += heldout_section(res["heldout"], model)
    parts += ladder_section(result)
    return "\n".join(parts)


def defaults_summary(result: dict) -> str:
    """The "How we chose the defaults" section of ``docs/results.md``: what the KV-side study chose and how it
    did against the targets, per model (the tables are in ``docs/study.md``)."""
    from tokenfilter.study.quality import CANDIDATES

    parts = ["## How we chose the defaults", "",
             "The library default comes from the KV-side study (`tokenfilter study --kv-side`): candidates within the "
             "KV budget of ratio 0.5 with a 64-token window, chosen on the selection half (even WikiText-2 windows, "
             "selection needle facts), reported on the held-out half (odd windows, other facts and depths). The "
             "full tables, the commands and the notes are in [study.md](study.md).", ""]
    for model, res in result.get("models", {}).items():
        held = res.get("heldout")
        if not held:
            continue
        chosen = held["chosen"]
        fields = ", ".join(f"{k}={v!r}" for k, v in CANDIDATES[chosen].items())
        picked = res.get("select", {}).get("choice", {}).get("chosen")
        how = ("named for this model's run" if picked is None else
               "the selection's choice" if picked == chosen
               else f"not the selection rule's choice `{picked}`: why, in the notes of study.md")
        parts += [f"### {model}", "", f"Reported: `{chosen}` ({how}; {fields}).", "",
                  *verdicts(held, model)[2:]]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Re-render the section from its JSON: ``python -m tokenfilter.study.quality_report JSON MARKDOWN``."""
    import argparse
    import json
    from pathlib import Path

    from tokenfilter.eval.sections import write_section

    parser = argparse.ArgumentParser(prog="python -m tokenfilter.study.quality_report")
    parser.add_argument("json", type=Path)
    parser.add_argument("markdown", type=Path)
    parser.add_argument("--results-md", type=Path, default=None,
                        help="also write the 'How we chose the defaults' section of this results file")
    args = parser.parse_args(argv)
    result = json.loads(args.json.read_text(encoding="utf-8"))
    write_section(args.markdown, "kv-study", render(result))
    if args.results_md:
        write_section(args.results_md, "study", defaults_summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
