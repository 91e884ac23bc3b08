"""Merge benchmark runs of one model and machine into one results JSON (for a grid run in several invocations).

    python -m tokenfilter.bench.merge first/results.json second/results.json ... -o results/bench/results.json

Cells and KV checks are concatenated (a later run's cell replaces an earlier one of the same batch, length and
method), the skipped list keeps what no run measured, the targets are evaluated again over all cells, and every
invocation's command, start, duration and load are kept under ``invocations``. The profile is the first run's that has
one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def merge(results: list[dict]) -> dict:
    from tokenfilter.bench.targets import evaluate_targets

    if not results:
        raise ValueError("Give at least one results.json to merge.")
    names = {r["model"]["name"] for r in results}
    if len(names) > 1:
        raise ValueError(f"These runs measured different models ({', '.join(sorted(names))}); merge one model's runs.")
    out = dict(results[0])
    cells: dict[tuple, dict] = {}
    checks: dict[tuple, dict] = {}
    for r in results:
        for c in r["cells"]:
            cells[(c["batch"], c["length"], c["label"])] = c
        for k in r.get("kv_checks", []):
            checks[(k["batch"], k["length"], k.get("label"), k["ratio"])] = k
    measured = {(b, t) for b, t, _ in cells}
    skipped = []
    for r in results:
        for s in r.get("skipped", []):
            if (s.get("batch", 1), s["length"]) not in measured and s not in skipped:
                skipped.append(s)
    out["cells"], out["kv_checks"], out["skipped"] = list(cells.values()), list(checks.values()), skipped
    out["config"] = dict(results[0]["config"])
    out["config"]["lengths"] = sorted({t for _, t, _ in cells})
    out["config"]["batch_sizes"] = sorted({b for b, _, _ in cells})
    out["machine"] = dict(results[0]["machine"], load_average_at_end=results[-1]["machine"].get("load_average_at_end"))
    out["elapsed_s"] = sum(r.get("elapsed_s", 0) for r in results)
    out["profile"] = next((r["profile"] for r in results if r.get("profile")), None)
    out["invocations"] = [
        {k: r.get(k) for k in ("command", "created", "elapsed_s")}
        | {"load_average_1_5_15min": r["machine"].get("load_average_1_5_15min"),
           "load_average_at_end": r["machine"].get("load_average_at_end")}
        for r in results
    ]
    out["command"] = "; ".join(r.get("command") or "?" for r in results)
    out["targets"] = evaluate_targets(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenfilter.bench.merge", description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="results.json files, in the order they ran")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        merged = merge([json.loads(p.read_text()) for p in args.results])
    except (OSError, json.JSONDecodeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(merged, indent=1))
    print(f"wrote {args.output} ({len(merged['cells'])} cells from {len(args.results)} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
