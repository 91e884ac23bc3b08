"""``tokenfilter bench --memory``: peak memory per method, each trial in a process of its own.

One process shows one peak for every method it runs (the allocator keeps what an earlier trial freed), so each
trial here is a child process (:mod:`tokenfilter.bench.memory_child`): it loads the model, resets its peak
resident set, prefills the prompt (whole, or in chunks through ``generate(prefill_chunk_size=N)``) and reports
the peak resident set of that call and the key/value bytes its cache held. Children run with
``MALLOC_MMAP_THRESHOLD_`` fixed (:data:`MALLOC_ENV`), so that large tensors are returned to the system when freed
and the resident set follows the live tensors.

Rows per context length and chunking: dense, the default ``TokenFilter(ratio=r)``, the sliding-window preset,
and each kvpress press asked for (kvpress's own code in the peer venv, ``tokenfilter peers --setup``) at the KV
the default held at that length, beside a dense row run in the same venv (its transformers loads and runs the
model differently, so its rows are compared with that dense row only). kvpress prefills densely and prunes after
each layer, so its rows run unchunked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHILD = Path(__file__).with_name("memory_child.py")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
DEFAULT_LENGTHS = [2048, 8192]
DEFAULT_CHUNKS = [0, 1024]  # 0: the prompt in one call
DEFAULT_PRESSES = ["ExpectedAttentionPress", "KnormPress"]
MIB = 2**20


@dataclass(frozen=True)
class Row:
    length: int
    chunk: int  # 0: one call
    label: str
    method: dict

    @property
    def kvpress(self) -> bool:
        return self.method["kind"] == "kvpress"


def plan(length: int, chunk: int, ratio: float, recent: int) -> list[Row]:
    """Our rows of one (length, chunking); kvpress rows are added once the default's KV is known."""
    return [
        Row(length, chunk, "dense", {"kind": "dense"}),
        Row(length, chunk, f"default (ratio {ratio:g})", {"kind": "tokenfilter", "preset": "default", "ratio": ratio}),
        Row(
            length,
            chunk,
            f"sliding window (R={recent})",
            {"kind": "tokenfilter", "preset": "sliding-window", "recent": recent},
        ),
    ]


def run_child(python: str | Path, spec: dict, workdir: Path) -> dict:
    """One child process on ``spec``; its JSON, or ``RuntimeError`` naming the last line it printed."""
    spec_path, out_path = workdir / "spec.json", workdir / "out.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    out_path.unlink(missing_ok=True)
    # -P: the child's folder must not shadow the standard library (this package has a profile.py).
    proc = subprocess.run(
        [str(python), "-P", str(CHILD), str(spec_path), str(out_path)],
        env={**os.environ, **MALLOC_ENV},
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not out_path.exists():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"The memory trial of {spec['method']} failed: {last}")
    return json.loads(out_path.read_text(encoding="utf-8"))


def _row_dict(row: Row, measured: dict, python: str | Path) -> dict:
    return {
        "length": row.length,
        "chunk": row.chunk,
        "label": row.label,
        "method": row.method,
        "python": str(python),
        **measured,
    }


def measure(
    ids: list[int],
    model: dict,
    lengths: list[int],
    chunks: list[int],
    ratio: float,
    recent: int,
    presses: list[str],
    peer_python: str | Path | None,
    log=print,
    progress: bool = True,
) -> list[dict]:
    """Every row, each in a child process. ``ids``: at least ``max(lengths)`` token ids; ``model``: the child's
    ``{"path", "kwargs", "dtype", "threads"}``."""
    from tqdm.auto import tqdm

    per_length = len(chunks) * 3 + (len(presses) + 1 if peer_python else 0)
    bar = tqdm(total=per_length * len(lengths), desc="memory trials", disable=not progress, file=sys.stderr)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for length in lengths:
            context = ids[:length]
            for chunk in chunks:
                for row in plan(length, chunk, ratio, recent):
                    bar.set_description(f"{length} tokens, {row.label}, chunk {chunk or 'none'}")
                    spec = {"model": model, "ids": context, "chunk": chunk or None, "method": row.method}
                    rows.append(_row_dict(row, run_child(sys.executable, spec, Path(tmp)), sys.executable))
                    bar.update()
            if not peer_python:
                continue
            held = _held_fraction(rows, length)
            peer_rows = [Row(length, 0, "dense, peer venv (kvpress's baseline)", {"kind": "dense"})] + [
                Row(
                    length,
                    0,
                    f"kvpress {press} (same KV)",
                    {"kind": "kvpress", "press": press, "ratio": round(1 - held, 4)},
                )
                for press in presses
            ]
            for row in peer_rows:
                bar.set_description(f"{length} tokens, {row.label}")
                try:
                    rows.append(
                        _row_dict(
                            row,
                            run_child(
                                peer_python,
                                {"model": model, "ids": context, "chunk": None, "method": row.method},
                                Path(tmp),
                            ),
                            peer_python,
                        )
                    )
                except RuntimeError as exc:
                    log(f"{exc} (row left out)")
                bar.update()
    bar.close()
    return rows


def _held_fraction(rows: list[dict], length: int) -> float:
    """The default's KV held at the end of one call over dense's, at ``length``."""
    by = {r["method"].get("preset", r["method"]["kind"]): r for r in rows if r["length"] == length and r["chunk"] == 0}
    if "dense" not in by or "default" not in by:
        by = {r["method"].get("preset", r["method"]["kind"]): r for r in rows if r["length"] == length}
    return by["default"]["kv_end"] / by["dense"]["kv_end"]


TARGET_SAVED_PER_KV = 0.8


def compare(rows: list[dict]) -> list[dict]:
    """Each row against dense at the same length and chunking: the KV it does not hold, the peak it saves, and
    their ratio (``peak_saved_per_kv``: 1.0 when the peak falls by exactly the KV not held). The peak saved is read
    on the call's own rise (peak minus the resident set before the call), so what an import adds before the call
    (kvpress's modules: tens of MiB) is not counted against a method. Rows from the peer venv (kvpress, with its own
    transformers) are compared with the dense row run in that venv."""
    dense = {(r["length"], r["chunk"], r["python"]): r for r in rows if r["method"]["kind"] == "dense"}

    def call_peak(r: dict) -> int | None:
        return r["peak_rss"] - r["rss_loaded"] if r["peak_rss"] and r["rss_loaded"] else None

    out = []
    for r in rows:
        d = dense.get((r["length"], r["chunk"], r["python"]))
        kv_not_held = d["kv_end"] - r["kv_end"] if d else None
        mine, theirs = call_peak(r), call_peak(d) if d else None
        peak_saved = theirs - mine if mine is not None and theirs is not None else None
        ratio = peak_saved / kv_not_held if peak_saved is not None and kv_not_held else None
        out.append(
            {**r, "kv_not_held": kv_not_held, "peak_saved": peak_saved, "peak_saved_per_kv": ratio, "call_peak": mine}
        )
    return out


def _mib(x: float | None) -> str:
    return "–" if x is None else f"{x / MIB:.1f}"


def render(result: dict) -> str:
    """The Markdown section of ``docs/performance.md``'s memory part."""
    lines = [
        "# Peak memory per method, each trial in a process of its own",
        "",
        "Generated by `" + result["command"] + "`; do not edit by hand, rerun instead.",
        "",
        f"- Model: {result['model_name']}, {result['dtype']}, batch 1, {result['threads']} torch thread(s); "
        f"inputs: {result['inputs']}; torch {result['versions'].get('torch')}, transformers "
        f"{result['versions'].get('transformers')} (kvpress rows: kvpress {result.get('kvpress') or '–'} with its own "
        "pinned transformers, in the peer venv).",
        "- Each row is one child process: load the model, reset the peak resident set (`/proc/self/clear_refs`), "
        "then one `generate(ids, max_new_tokens=1)` (the prefill and the first token). **peak MiB**: the peak "
        "resident set of that call (`VmHWM`, weights included); **call MiB**: that peak minus the resident set "
        "before the call. Children run with `MALLOC_MMAP_THRESHOLD_=65536`, so freed tensors leave the resident set.",
        "- **KV end / KV peak**: bytes of the key/value tensors the cache held at the end of the call and at their "
        "largest during it (read after each attention module, before a kvpress hook prunes that layer).",
        "- **peak saved**: how much lower the call's peak is than dense's at the same chunking (call MiB against "
        "call MiB, so an import that adds to the resident set before the call does not count); **saved / KV not "
        "held**: that over the KV bytes the method does not hold at the end; 1.0 means the peak falls by exactly "
        "the KV not held. kvpress rows run in the peer venv (another transformers), so they are compared with the "
        "dense row run there.",
        "",
        "| context | chunk | method | peak MiB | call MiB | KV end MiB | KV peak MiB | KV not held MiB "
        "| peak saved MiB | saved / KV not held | seconds |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in compare(result["rows"]):
        ratio = "–" if r["peak_saved_per_kv"] is None else f"{r['peak_saved_per_kv']:.2f}"
        lines.append(
            f"| {r['length']} | {r['chunk'] or 'one call'} | {r['label']} | {_mib(r['peak_rss'])} "
            f"| {_mib(r['call_peak'])} | {_mib(r['kv_end'])} | {_mib(r['kv_peak'])} | {_mib(r['kv_not_held'])} "
            f"| {_mib(r['peak_saved'])} | {ratio} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines + [""] + _target_lines(compare(result["rows"]))) + "\n"


def _target_lines(rows: list[dict]) -> list[str]:
    """Performance III's memory target, read from the rows: at the longest context with chunked prefill, the
    default's peak falls below dense's by at least 0.8 of the KV it does not hold."""
    cells = [r for r in rows if r["method"].get("preset") == "default" and r["chunk"] and r["peak_saved_per_kv"]]
    if not cells:
        return []
    r = max(cells, key=lambda c: (c["length"], c["chunk"]))
    verdict = "met" if r["peak_saved_per_kv"] >= TARGET_SAVED_PER_KV else "missed"
    return [
        f"**Target** (the default, {r['length']} tokens, prefill in chunks of {r['chunk']}): its peak is "
        f"{_mib(r['peak_saved'])} MiB below dense's for {_mib(r['kv_not_held'])} MiB of KV not held, "
        f"{r['peak_saved_per_kv']:.2f} of it (target >= {TARGET_SAVED_PER_KV}): {verdict}."
    ]


def run(args, command: str, threads: int) -> int:
    """``tokenfilter bench --memory``: measure, write ``memory.json`` under ``--output`` (and the docs page with
    ``--write-docs``), print the table."""
    from transformers import AutoTokenizer

    from tokenfilter.bench.data import TokenSource
    from tokenfilter.loading import display_name, model_source
    from tokenfilter.peers import env as peer_env

    if getattr(args, "shape", None):
        raise ValueError("--memory measures a checkpoint (--model); a random --shape has no tokenizer or file to load.")
    lengths = args.lengths or DEFAULT_LENGTHS
    ratio = (args.kv_ratios or args.ratios or [0.5])[0]
    presses = [p for p in (args.presses or DEFAULT_PRESSES) if p.lower() != "none"]
    peer_python, kvpress_version = None, None
    if presses:
        try:
            peer_python = peer_env.check().python
            kvpress_version = peer_env.PINS["kvpress"]
        except peer_env.PeerEnvError as exc:
            print(f"{exc} The kvpress rows are left out (--presses none says so quietly).", file=sys.stderr)
    folder, kwargs = model_source(args.model)
    tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    source = TokenSource.build(tok, max(lengths), tok.vocab_size, args.data, args.seed)
    model = {"path": folder, "kwargs": kwargs, "dtype": args.dtype, "threads": threads}
    rows = measure(
        source.ids[: max(lengths)].tolist(),
        model,
        lengths,
        args.chunks or DEFAULT_CHUNKS,
        ratio,
        args.recent or 64,
        presses,
        peer_python,
        progress=not args.no_progress,
        log=lambda s: print(s, file=sys.stderr),
    )
    ours = next(r for r in rows if r["method"]["kind"] != "kvpress")
    result = {
        "command": command,
        "model_name": display_name(args.model),
        "dtype": args.dtype,
        "threads": threads,
        "inputs": source.kind,
        "versions": ours["versions"],
        "kvpress": kvpress_version,
        "rows": rows,
    }
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "memory.json"]
    paths[0].write_text(json.dumps(result, indent=1), encoding="utf-8")
    text = render(result)
    if args.write_docs:
        Path(args.write_docs).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write_docs).write_text(text, encoding="utf-8")
        paths.append(Path(args.write_docs))
    print(text)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
