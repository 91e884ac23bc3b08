"""Markdown for the KV-side quality study (``study.quality``): tables and verdicts computed from its JSON."""

from __future__ import annotations

from tokenfilter.study.quality import ppl_target


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def _ppl_cells(row: dict, dense: float) -> list[str]:
    return [f"{row['ppl']:.2f}", f"{row['ppl'] / dense:.3f}", f"{row['kv_held']:.3f}", f"{row['pairs']:.3f}"]


def select_section(sel: dict, ratio: float) -> list[str]:
    dense = sel["dense"]["ppl"]
    choice = sel["choice"]
    forced = sel["dense"]["needle"].get("scoring") == "teacher-forced"
    out = [f"### Selection half (even WikiText-2 windows, selection needle facts and depths), ratio {ratio}", "",
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


def heldout_section(held: dict, model: str) -> list[str]:
    dense = held["dense"]["ppl"]
    out = [f"### Held-out half: {model} (odd WikiText-2 windows, held-out needle facts and depths)", "",
           f"Chosen: `{held['chosen']}`. Dense PPL {dense:.2f}. Random: mean over seeds (min-max). Sliding window: "
           "sinks + recent window holding the same KV as the chosen configuration on the same input.", ""]
    rows = []
    for ratio, runs in held["runs"].items():
        rnd = [r["ppl"] for r in runs["random"]]
        mean = sum(rnd) / len(rnd)
        rows.append([ratio, "chosen", *_ppl_cells(runs["chosen"], dense)])
        rows.append([ratio, f"random x{len(rnd)}", f"{mean:.2f} ({min(rnd):.2f}-{max(rnd):.2f})",
                     f"{mean / dense:.3f}", f"{runs['random'][0]['kv_held']:.3f}", f"{runs['random'][0]['pairs']:.3f}"])
        rows.append([ratio, "sliding window", *_ppl_cells(runs["sliding_window"], dense)])
        rows.append([ratio, "paper", *_ppl_cells(runs["paper"], dense)])
    out += _table(["ratio", "method", "PPL", "x dense", "KV held", "pairs"], rows)
    needle = [(ratio, runs) for ratio, runs in held["runs"].items() if "needle" in runs["chosen"]]
    if "needle" in held["dense"] and needle:
        lengths = list(held["dense"]["needle"]["by_length"])
        head = ["ratio", "method", "found", "x dense", *(f"{n} tokens" for n in lengths)]
        base = held["dense"]["needle"]["found"]

        def cells(nd: dict) -> list[str]:
            per = [f"{nd['by_length'][n]['found']:.2f} (KV {nd['by_length'][n]['kv_held']:.2f})" for n in lengths]
            return [f"{nd['found']:.2f}", f"{nd['found'] / base:.2f}" if base else "–", *per]

        def row(ratio: str, name: str, run: dict) -> list[str]:
            if "needle" not in run:  # a run stopped before this measurement
                return [ratio, name, "not measured", "–", *("–" for _ in lengths)]
            return [ratio, name, *cells(run["needle"])]

        rows = [["–", "dense", *cells(held["dense"]["needle"])]]
        for ratio, runs in needle:
            rows.append(row(ratio, "chosen", runs["chosen"]))
            rows.append(row(ratio, "sliding window", runs["sliding_window"]))
            rows += [row(ratio, f"random seed {s}", r) for s, r in enumerate(runs["random"])]
        cells_n = held["dense"]["needle"]["cells"]
        out += ["", f"Needle in a haystack, held-out facts ({cells_n} prompts per method; one prompt = "
                f"{1 / cells_n:.3f}):", "", *_table(head, rows)]
    out += verdicts(held, model)
    return [*out, ""]


def verdicts(held: dict, model: str) -> list[str]:
    """The issue's targets, each checked on the numbers above."""
    dense = held["dense"]["ppl"]
    out = ["Targets (issue 15), computed:", ""]
    for ratio, runs in held["runs"].items():
        x = runs["chosen"]["ppl"] / dense
        target = ppl_target(model, float(ratio))
        if target:
            verdict = "met" if x <= target else "MISSED"
            out.append(f"- ratio {ratio}: PPL x{x:.3f} dense, target <= x{target}: {verdict}.")
        rnd = [r["ppl"] for r in runs["random"]]
        gap = min(rnd) - runs["chosen"]["ppl"]
        spread = max(rnd) - min(rnd)
        out.append(f"- ratio {ratio}: beats its random twin on PPL by {gap:.2f} against a seed range of {spread:.2f}: "
                   f"{'met' if gap > spread else 'MISSED'}.")
        if "needle" in runs["chosen"] and "needle" in held["dense"]:
            out += _needle_verdicts(ratio, runs, held["dense"]["needle"]["found"])
    return [*out, ""]


def _needle_verdicts(ratio: str, runs: dict, base: float) -> list[str]:
    found = runs["chosen"]["needle"]["found"]
    rnd = [r["needle"]["found"] for r in runs["random"] if "needle" in r]
    share = found / base if base else float("nan")
    out = [f"- ratio {ratio}: needle {found:.2f} = {share:.2f} of dense ({base:.2f}), target >= 0.80: "
           f"{'met' if share >= 0.8 else 'MISSED'}."]
    if "needle" in runs["sliding_window"]:
        sw = runs["sliding_window"]["needle"]["found"]
        out.append(f"- ratio {ratio}: needle against the sliding window at equal KV ({sw:.2f}): "
                   f"{'more' if found > sw else 'NOT more'}.")
    else:
        out.append(f"- ratio {ratio}: needle against the sliding window at equal KV: not measured.")
    if len(rnd) < 2:
        out.append(f"- ratio {ratio}: needle against its random twin: not measured over seeds.")
    else:
        spread = max(rnd) - min(rnd)
        out.append(f"- ratio {ratio}: needle against its random twin ({', '.join(f'{v:.2f}' for v in rnd)}; range "
                   f"{spread:.2f}): {'beaten by more than the range' if found - max(rnd) > spread else 'MISSED'}.")
    return out


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
    done = list(res.get("heldout", {}).get("runs", {}))
    if [r for r in asked if r not in done]:
        out.append(f"held-out ratios asked but not measured: {', '.join(r for r in asked if r not in done)}")
    if not res.get("config", {}).get("needle_lengths"):
        out.append("no needle")
    return out


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
            parts += select_section(res["select"], res["config"]["budget_ratio"])
        if "heldout" in res:
            parts += heldout_section(res["heldout"], model)
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
    args = parser.parse_args(argv)
    write_section(args.markdown, "kv-study", render(json.loads(args.json.read_text(encoding="utf-8"))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
