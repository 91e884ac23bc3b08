"""``tokenfilter longgen``: long generation under a bounded cache (``longctx/longgen.py``), from the command line."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from tokenfilter.cli_args import int_at_least, names, positive_int, positive_ints, ratios

TEXTS = ("wikitext", "essays")  # the reported texts (the default)
SELECTION_TEXTS = ("wikitext-sel", "essays-sel")  # for choosing settings, never reported
RECALL_JSON, MEMORY_JSON = "recall.json", "memory.json"
PARTS = ("ppl", "memory", "recall")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="built-in name, .gguf file, folder or hub id (default smollm2-135m)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--prompt", type=positive_int, default=512, help="prompt tokens (default 512)")
    p.add_argument("--continuation", type=positive_int, default=4096,
                   help="continuation tokens scored after the prompt (default 4096)")
    p.add_argument("--texts", type=names, default=list(TEXTS),
                   help="wikitext (WikiText-2 test, from its middle) and/or essays (default both); wikitext-sel "
                   "(the first half, the studies' selection half) and essays-sel (from character 300,000) for "
                   "choosing settings")
    p.add_argument("--recent-shares", type=ratios, default=[],
                   help="also each budget with a recent window of these shares of it (rows budget-N-recentR), to "
                   "choose the budget's window (default none)")
    p.add_argument("--ratios", type=ratios, default=[0.3, 0.5, 0.7], help="the default at these ratios (0.3,0.5,0.7)")
    p.add_argument("--budgets", type=positive_ints_or_none, default=[512, 1024, 2048],
                   help="KV budgets, entries per filtered layer (default 512,1024,2048; \"\" for none)")
    p.add_argument("--seeds", type=positive_ints_or_zero, default=[0, 1, 2], help="random twins' seeds (0,1,2)")
    p.add_argument("--presses", type=names, default=["StreamingLLMPress", "KnormPress"],
                   help="kvpress scorer presses run as its DecodingPress at each budget, in kvpress's own venv "
                   "(default StreamingLLMPress,KnormPress; 'none' for none)")
    p.add_argument("--press-budgets", type=positive_ints, default=None,
                   help="the budgets the presses run at (default: every budget)")
    p.add_argument("--chunk", type=int_at_least(1), default=512,
                   help="tokens per call for dense, budgets and StreamingLLM (default 512)")
    p.add_argument("--recall-samples", type=positive_int, default=3,
                   help="the recall task (a long greedy answer that copies a list read far back): prompts per row "
                   "(default 3)")
    p.add_argument("--recall-records", type=int_at_least(2), default=64,
                   help="records in each recall list (default 64: about 950 prompt tokens and 900 new ones)")
    p.add_argument("--parts", type=parts, default=list(PARTS),
                   help="ppl (continuation perplexity, and kvpress's rows), memory (a greedy generate of "
                   "--continuation tokens after --prompt, dense, the middle ratio and the middle budget, each in a "
                   "process of its own: peak resident set and KV bytes), recall (a long greedy answer with a checkable "
                   "result); default all three. Parts write their own files in OUTPUT, so they may run in separate "
                   "processes at once; a later run with --resume assembles them")
    p.add_argument("--threads", type=positive_int, default=1, help="CPU threads (default 1)")
    p.add_argument("--resume", action="store_true", help="keep the rows a saved longgen.json measured the same way")
    p.add_argument("--output", type=Path, default=Path("results/longgen"))
    p.add_argument("--results-md", type=Path, default=None, help="also write the table as a section of this file")


def parts(text: str) -> list[str]:
    got = names(text)
    unknown = [p for p in got if p not in PARTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown part(s) {', '.join(unknown)}; use {', '.join(PARTS)}")
    return got


def positive_ints_or_none(text: str) -> list[int]:
    return positive_ints(text) if text.strip() else []


def positive_ints_or_zero(text: str) -> list[int]:
    out = [int(x) for x in text.split(",") if x.strip()]
    if not out or any(x < 0 for x in out):
        raise argparse.ArgumentTypeError(f"give whole numbers >= 0 separated by commas, got {text!r}")
    return out


def texts(names_: list[str]) -> dict[str, str]:
    from tokenfilter.eval.ppl import wikitext_text
    from tokenfilter.longctx.needle import load_haystack_text

    unknown = [n for n in names_ if n not in TEXTS + SELECTION_TEXTS]
    if unknown:
        raise ValueError(f"Unknown text(s) {unknown}; use {', '.join(TEXTS + SELECTION_TEXTS)}.")
    out = {}
    for name in names_:
        if name == "wikitext":
            text = wikitext_text()
            out[name] = text[len(text) // 2 :]  # the second half: away from the windows the studies select on
        elif name == "wikitext-sel":
            text = wikitext_text()
            out[name] = text[100_000 : len(text) // 2]
        elif name == "essays-sel":
            out[name] = load_haystack_text()[300_000:]  # the reported essays are its first ~20,000 characters
        else:
            out[name] = load_haystack_text()
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from tokenfilter.eval.sections import write_section
    from tokenfilter.loading import display_name, load_model
    from tokenfilter.longctx.longgen import (
        JSON_NAME,
        MD_NAME,
        plan_rows,
        render_markdown,
        run_longgen,
        save,
        sequences,
        setup_meta,
    )

    torch.set_num_threads(args.threads)
    for n in args.budgets:
        if n >= args.prompt + args.continuation:
            raise ValueError(f"--budgets {n} holds the whole sequence ({args.prompt + args.continuation} tokens).")
    presses = [] if args.presses == ["none"] else args.presses
    rows = plan_rows(args.ratios, args.budgets, args.seeds, presses, args.press_budgets, args.recent_shares)
    model, tok = load_model(args.model, args.dtype)
    seqs = sequences(tok, texts(args.texts), args.prompt + args.continuation)
    earlier = _earlier_press_results(args.output / JSON_NAME) if args.resume else {}
    command = "tokenfilter longgen " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["longgen"] else sys.argv[1:])
    meta = {"model": display_name(args.model), "dtype": args.dtype, "threads": args.threads, "command": command,
            "chunk": args.chunk}
    text = f"Generated by `{command}` on {meta['model']} ({args.dtype}, {args.threads} thread(s)).\n\n"
    if "ppl" in args.parts:
        results = run_longgen(model, seqs, args.prompt, rows, args.output, args.chunk, meta, args.resume)
        results += run_presses(args, rows, seqs, earlier)
        save(args.output / JSON_NAME, setup_meta(meta, args.prompt, seqs), results)
        text += (f"Perplexity: {args.prompt} prompt tokens, then {args.continuation} continuation tokens scored, read "
                 "through the cache as generation reads them (a ratio token by token; dense, budgets and "
                 f"StreamingLLM in calls of {args.chunk}, which read as token by token does). KV held: share of "
                 "dense over all layers after the last token; peak held: most entries one filtered layer held.\n\n"
                 + render_markdown(results, rows, meta))
    if "memory" in args.parts:
        text += "\n" + _memory(args, rows, seqs)
    if "recall" in args.parts:
        text += "\n" + _recall(args, model, tok, rows, meta)
    (args.output / MD_NAME).write_text(text)
    print(text)
    if args.results_md is not None:
        write_section(args.results_md, "longgen", text)
    return 0


def _recall(args: argparse.Namespace, model, tok, rows: list, meta: dict) -> str:
    """The recall part: every row but kvpress's, greedy answers; its table with a line saying what ran."""
    from tokenfilter.longctx.recall import MARGIN, recall_rows, render_recall, run_recall_file

    chosen = recall_rows(rows)
    results = run_recall_file(model, tok, chosen, args.recall_records, args.recall_samples,
                              args.output / RECALL_JSON, meta, args.resume)
    prompt = sum(r.tokens for r in results) / len(results) if results else 0
    return (f"Recall: {args.recall_samples} prompt(s) of {args.recall_records} numbered records `word: number` "
            f"(about {prompt:.0f} tokens with the answer); the model is asked to write the list again and given its "
            f"first line, then decodes greedily through the cache (the list's length + {MARGIN} tokens). Score: "
            "RULER's string match, the share of the other records whose whole line is in the answer. Random twins "
            "at one seed; kvpress's rows do not run here.\n\n" + render_recall(results, chosen))


def _earlier_press_results(path: Path) -> dict[tuple[str, str], dict]:
    """The kvpress rows of a saved run (what ``--resume`` keeps when their press and budget are the same)."""
    import json

    if not path.exists():
        return {}
    return {(r["text"], r["row"]): r for r in json.loads(path.read_text())["results"]
            if r["row"].startswith("kvpress-")}


def run_presses(args: argparse.Namespace, rows: list, seqs: dict, earlier: dict) -> list:
    """The kvpress rows: each sequence's continuation under kvpress's ``DecodingPress`` over the row's scorer press,
    token by token in kvpress's venv. Its target is the budget less the entries written between two compressions,
    so that it holds at most the budget after every step (the measured peak is reported)."""
    import json
    import math
    import tempfile

    from tokenfilter.longctx.longgen import Result
    from tokenfilter.peers.cli import _model_file, _peer_env, peer_model_spec, run_peer_script
    from tokenfilter.peers.peer_script import DECODING_INTERVAL

    peer_rows = [r for r in rows if r.peer is not None]
    results, jobs = [], []
    for text in seqs:
        for row in peer_rows:
            config = {"peer": row.peer, "budget": row.budget, "interval": DECODING_INTERVAL}
            old = earlier.get((text, row.name))
            if old is not None and old.get("config") == config:
                results.append(Result(**old))
                continue
            jobs.append({"key": f"{text}/{row.name}", "sequence": text, "base": row.peer,
                         "target_size": row.budget - (DECODING_INTERVAL - 1), "row": row.name, "config": config})
    if not jobs:
        return results
    spec = {
        "model": peer_model_spec(_model_file(args.model)[0], args.dtype, args.threads),
        "sequences": [{"id": t, "ids": ids[0].tolist(), "prompt_len": args.prompt} for t, ids in seqs.items()],
        "jobs": jobs,
    }
    peer = _peer_env()
    with tempfile.TemporaryDirectory() as tmp:
        in_json, out_json = Path(tmp) / "in.json", Path(tmp) / "out.json"
        in_json.write_text(json.dumps(spec))
        out = run_peer_script(peer, in_json, out_json)
    by_key = {r["key"]: r for r in out["results"]}
    for job in jobs:
        r = by_key.get(job["key"])
        if r is None or r.get("error"):
            print(f"tokenfilter: kvpress {job['key']} failed: {r and r.get('error')}", file=sys.stderr)
            continue
        results.append(Result(
            text=job["sequence"], row=job["row"], ppl=math.exp(r["nll"] / r["tokens"]), nll=r["nll"],
            tokens=r["tokens"], realized=0.0, kv_held=r["kv_held"], peak_held=r["peak_held"], seconds=r["seconds"],
            config=job["config"],
        ))
    return results


def _memory(args: argparse.Namespace, rows: list, seqs: dict) -> str:
    """The memory part: a greedy ``generate`` of ``--continuation`` new tokens after the first text's prompt, per
    row (dense, the default at the middle ratio, the middle budget), each in a child process
    (``bench/memory_child.py``): the peak resident set above the loaded model, and the key/value bytes the cache held
    at the end and at most."""
    import json
    import tempfile

    from tqdm.auto import tqdm

    from tokenfilter.bench.memory import MIB, run_child
    from tokenfilter.loading import model_source

    folder, kwargs = model_source(args.model)
    model = {"path": folder, "kwargs": kwargs, "dtype": args.dtype, "threads": args.threads}
    ids = next(iter(seqs.values()))[0, : args.prompt].tolist()
    methods = [("dense", {"kind": "dense"})]
    ratio_rows = [r for r in rows if r.family == "ratio"]
    if ratio_rows:
        mid = ratio_rows[len(ratio_rows) // 2]
        methods.append((mid.name, {"kind": "tokenfilter", "preset": "default", "ratio": mid.filter.ratio}))
    budget_rows = [r for r in rows if r.family == "budget"]
    if budget_rows:  # the middle budget: a generate of this length takes minutes per row on one core
        mid = budget_rows[len(budget_rows) // 2]
        methods.append((mid.name, {"kind": "tokenfilter", "preset": "budget", "budget": mid.filter.budget}))
    path = args.output / MEMORY_JSON
    old = json.loads(path.read_text()) if args.resume and path.exists() else {"rows": []}
    kept = {json.dumps(r["spec"], sort_keys=True): r for r in old["rows"]}
    out = []
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=len(methods), desc="memory", unit="run") as bar:
        for name, method in methods:
            spec = {"model": model, "ids": ids, "chunk": None, "new_tokens": args.continuation, "method": method}
            key = json.dumps(spec, sort_keys=True)
            bar.set_postfix_str(name)
            row = kept.get(key) or {"name": name, "spec": spec, **run_child(sys.executable, spec, Path(tmp))}
            out.append(row)
            path.write_text(json.dumps({"rows": out}, indent=1))
            bar.update()
    dense = out[0]

    def mib(x: float | None) -> str:
        return "-" if x is None else f"{x / MIB:.1f}"

    lines = [f"Memory: one greedy `generate` of {args.continuation} new tokens after the first {args.prompt} tokens "
             f"of the {next(iter(seqs))} text, each row in a process of its own ({args.threads} thread(s)). Peak RSS: "
             "the process's peak resident set during the call, above the loaded model; KV: bytes of the key/value "
             "tensors the cache holds (at the end of the call, and at most after any layer's forward); realized: the "
             "filtered share of (token, filtered layer) pairs over the prompt and the model's own greedy tokens.\n",
             "| method | realized | KV at the end (MiB) | KV peak (MiB) | peak RSS above loaded (MiB) | seconds |",
             "|---|---|---|---|---|---|"]
    for r in out:
        rss = None if r["peak_rss"] is None or r["rss_loaded"] is None else r["peak_rss"] - r["rss_loaded"]
        rel = f" ({r['kv_end'] / dense['kv_end']:.2f} of dense)" if dense["kv_end"] else ""
        realized = "-" if r.get("realized") is None else f"{r['realized']:.3f}"  # dense; rows measured before it
        lines.append(f"| {r['name']} | {realized} | {mib(r['kv_end'])}{rel} | {mib(r['kv_peak'])} | {mib(rss)} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"
