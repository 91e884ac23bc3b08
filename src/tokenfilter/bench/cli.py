"""``tokenfilter bench`` / ``python -m tokenfilter.bench``: prefill latency, decode throughput and KV-cache
bytes, dense vs Token Filtering, written as JSON + PNG (and ``docs/performance.md`` with ``--write-docs``).

By default it measures the library default, ``TokenFilter(ratio=r)`` (``--modes kv``: the KV side, skip="none",
recent window 64, rows ``KV side r (R=64) — the default``); ``--modes query`` measures the paper's query-side reading
(rows ``query side r``), ``sliding-window`` StreamingLLM's rule; each row names its mode. The overhead run (nothing
filtered), the profiled cell and the paired measurement use the first of query/kv asked for (by default the KV side).

The defaults fit in about 10 minutes on 2 CPU cores: SmolLM2-135M, batch 1, contexts 512/1024/2048, 32 decode
steps, ratios 0.3/0.5/0.7 plus the scoring-only overhead run, 1 warm-up + 3 timed rounds. The full grid (``--full``):
``--lengths 512,1024,2048,4096,8192 --batch-sizes 1,4 --new-tokens 128 --repeats 5``; 8192 is SmolLM2-135M's
``max_position_embeddings``, so its decode steps run past it (RoPE: the same work), and a longer context is skipped.

``--shape llama-3-8b|llama-2-7b|smollm2-135m`` benchmarks a random-weight model of that shape instead of a
checkpoint (timing does not depend on the weights; ``--layers`` scales the depth down; every shape holds 131072
positions, so ``--shape smollm2-135m --layers 2 --lengths 8192,16384`` runs 16384 tokens on a CPU), and ``--device cuda
--dtype bfloat16`` runs it on a GPU with CUDA-event timing and ``torch.cuda.max_memory_allocated``. The GPU grid of
issue 12 is ``GPU_COMMAND`` below.

This module imports nothing heavy at import time: ``tokenfilter bench --help`` starts without torch.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from tokenfilter.cli_args import MODEL_HELP, int_at_least, positive_int, positive_ints  # noqa: F401 (positive_ints: also imported from here)

DEFAULTS = dict(lengths=[512, 1024, 2048], ratios=[0.3, 0.5, 0.7], batch_sizes=[1], new_tokens=32, repeats=3, warmup=1)
QUICK = dict(lengths=[128, 256], ratios=[0.5], batch_sizes=[1], new_tokens=8, repeats=2, warmup=1)
FULL_LENGTHS = [512, 1024, 2048, 4096, 8192]
SHAPE_NAMES = ("llama-3-8b", "llama-2-7b", "smollm2-135m")  # tokenfilter.bench.shapes.SHAPES (kept in step by a test)
MODE_NAMES = ("query", "kv", "sliding-window")  # tokenfilter.bench.grid.MODES
DEFAULT_MODES = ("kv",)  # tokenfilter.bench.grid.DEFAULT_MODES: the library default, TokenFilter(ratio=r)
GPU_COMMAND = (
    "tokenfilter bench --shape llama-3-8b --device cuda --dtype bfloat16 --lengths 4096,8192,16384,32768 "
    "--batch-sizes 1,8 --new-tokens 128 --ratios 0.3,0.5,0.7 --modes kv,query,sliding-window --repeats 3 "
    "--output results/bench-gpu --write-docs docs/performance-gpu.md"
)


def _ratios(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every ratio must be in (0, 1), got {text!r}")
    return values


_non_negative = int_at_least(0)


def _non_negative_ints(text: str) -> list[int]:
    return [_non_negative(x) for x in text.split(",") if x.strip()]


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODE_NAMES]
    if not modes or bad:
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODE_NAMES)} (comma-separated), got {text!r}")
    return modes


def _threads(text: str) -> str | int:
    return "auto" if text == "auto" else positive_int(text)


def choose_threads(setting: str | int | None) -> tuple[int, str]:
    """Apply the ``--threads`` setting; return (threads, why)."""
    import os

    import torch

    if setting in (None, "auto"):
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
        if load >= 1.0:
            torch.set_num_threads(1)
            return 1, f"auto: the 1-minute load average was {load:.2f} before the run (other jobs), so 1 thread"
        return torch.get_num_threads(), "auto: idle machine, torch's default"
    torch.set_num_threads(int(setting))
    return int(setting), "set by --threads"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the bench options to ``parser`` (the ``tokenfilter bench`` sub-command or a stand-alone parser)."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None, help=MODEL_HELP)
    g.add_argument("--shape", default=None, choices=SHAPE_NAMES,
                   help="instead of --model: a random-weight Llama of this shape (llama-3-8b: 32 layers, hidden 4096, "
                   "32/8 heads, MLP 14336; llama-2-7b: 32/32 heads, MLP 11008; smollm2-135m), built on --device")
    g.add_argument("--layers", type=positive_int, default=None,
                   help="with --shape: this many layers instead of the shape's own (a scaled-down check)")
    g.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or auto (default: cuda when one is available, else cpu)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"],
                   help="the dense layers' attention implementation (default sdpa: its fastest kernel)")
    g.add_argument("--threads", type=_threads, default="auto",
                   help="torch threads, or 'auto' (default): torch's choice on an idle machine, 1 when the load "
                   "average is already >= 1 (OpenMP threads waiting on busy cores slow down several-fold)")
    g.add_argument("--malloc", default="keep", choices=["keep", "system"],
                   help="keep (default): glibc's malloc keeps freed memory for the next tensor, for every method "
                   "alike, so that page faults from what the process allocated before do not decide a comparison "
                   "(tokenfilter.bench.malloc); system: the allocator as configured. Timings only: --memory never "
                   "changes it")
    g.add_argument("--omp-wait", default="passive", choices=["passive", "system"],
                   help="passive (default): idle OpenMP threads sleep at once (OMP_WAIT_POLICY=PASSIVE, set before "
                   "torch loads, unless the environment names a policy), for every method alike, so that with "
                   "several threads a core another process keeps busy does not stall each parallel operator "
                   "(tokenfilter.bench.openmp); system: OpenMP as configured")
    g = parser.add_argument_group("grid (defaults fit ~10 min on 2 CPU cores)")
    g.add_argument("--lengths", type=positive_ints, default=None,
                   help=f"context lengths (default {','.join(map(str, DEFAULTS['lengths']))}; "
                   f"full: {','.join(map(str, FULL_LENGTHS))}; a context longer than the model's positions is "
                   "skipped; every --shape holds 131072, e.g. 16384)")
    g.add_argument("--ratios", type=_ratios, default=None, help="filtering ratios (default 0.3,0.5,0.7)")
    g.add_argument("--batch-sizes", type=positive_ints, default=None, help="batch sizes (default 1; full: 1,4)")
    g.add_argument("--new-tokens", type=_non_negative, default=None,
                   help="decode steps per trial (default 32; full: 128)")
    g.add_argument("--repeats", type=positive_int, default=None, help="timed rounds per cell (default 3)")
    g.add_argument("--warmup", type=_non_negative, default=None,
                   help="untimed rounds of every method before the timed ones, on the shortest context of each "
                   "batch size (default 1)")
    g.add_argument("--max-batch-tokens", type=positive_int, default=None, metavar="N",
                   help="skip the cells whose batch size x context length exceeds N (e.g. --full --max-batch-tokens "
                   "8192: batch 1 up to 8192 tokens, batch 4 up to 2048); skipped cells are listed in the report")
    g.add_argument("--full", action="store_true",
                   help="the full grid: lengths up to 8192 (SmolLM2-135M's positions), batch 1,4, 128 new tokens")
    g.add_argument("--quick", action="store_true", help="a smoke run: lengths 128,256, ratio 0.5, 8 new tokens")
    g = parser.add_argument_group("Token Filtering")
    g.add_argument("--kv", default="drop", choices=["drop", "keep"],
                   help="the query mode's (the KV side always drops: that is what it is)")
    g.add_argument("--skip", default="attention", choices=["attention", "block"], help="the query mode's")
    g.add_argument("--schedule", default="uniform", choices=["uniform", "tail-linear"],
                   help="uniform from layer 2 (the library default) or the paper's tail-linear from L // 2")
    g.add_argument("--no-overhead", action="store_true",
                   help="leave out the nothing-filtered run (threshold 2: scoring only, in the first mode's "
                   "configuration)")
    g.add_argument("--modes", type=_modes, default=list(DEFAULT_MODES), metavar="LIST",
                   help="filtering modes, comma-separated: kv (the default: the library default TokenFilter(ratio=r) "
                   "at each ratio, the KV side with its recent window), query (the paper's query side: "
                   "skip='attention' at each ratio), sliding-window (TokenFilter.sliding_window(R)); the overhead run, "
                   "the profiled cell and --paired-steps follow the first of kv/query given")
    g.add_argument("--kv-ratios", type=_ratios, default=None, help="ratios of the kv mode (default: --ratios)")
    g.add_argument("--recent", type=positive_int, default=None, metavar="R",
                   help="the window of the kv and sliding-window modes (default: the library's, 64)")
    g.add_argument("--paired-steps", type=_non_negative, default=0, metavar="N",
                   help="also measure the nothing-filtered overhead and the first mode's highest ratio finely: N "
                   "decode steps dense and filtered in turn on two caches, plus --paired-prefills prefill pairs, per "
                   "cell (the overhead target then reads it; 0 = off)")
    g.add_argument("--paired-prefills", type=positive_int, default=6, metavar="N",
                   help="prefill pairs of the paired measurement up to 1024 tokens, halved per doubling of the "
                   "context beyond, at least 2 (default 6)")
    g = parser.add_argument_group("inputs and outputs")
    g.add_argument("--data", default=None, help="text file for the contexts (default ../shared/data/wikitext-2 test)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--output", type=Path, default=Path("results/bench"), help="folder for results.json and speedup.png")
    g.add_argument("--write-docs", nargs="?", type=Path, const=Path("docs/performance.md"), default=None,
                   metavar="PATH", help="also write the Markdown report (default path docs/performance.md)")
    g.add_argument("--notes", type=Path, default=None, help="Markdown appended to the report's Analysis section")
    g.add_argument("--no-profile", action="store_true", help="skip the time breakdown of one cell")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-gc", action="store_true", help="no gc.collect() before each trial (faster, noisier)")
    g = parser.add_argument_group("peak memory per process (--memory)")
    g.add_argument("--memory", action="store_true",
                   help="instead of timings: each method's peak memory in a process of its own (default lengths "
                   "2048,8192; the kv ratio; the sliding window; kvpress presses at the same KV)")
    g.add_argument("--chunks", type=_non_negative_ints, default=None, metavar="LIST",
                   help="prefill chunk sizes for --memory, 0 = one call (default 0,1024)")
    g.add_argument("--presses", type=lambda s: [p for p in s.split(",") if p], default=None, metavar="LIST",
                   help="kvpress presses for --memory at the default's KV (default ExpectedAttentionPress,KnormPress; "
                   "none: no kvpress rows)")


def config_from_args(args: argparse.Namespace):
    from tokenfilter.bench.grid import BenchConfig

    base = dict(DEFAULTS)
    if getattr(args, "full", False):
        base.update(lengths=FULL_LENGTHS, batch_sizes=[1, 4], new_tokens=128, repeats=5)
    if getattr(args, "quick", False):
        base.update(QUICK)
    for key in base:
        value = getattr(args, key, None)
        if value is not None:
            base[key] = value
    return BenchConfig(
        **base,
        max_batch_tokens=getattr(args, "max_batch_tokens", None),
        overhead=not args.no_overhead,
        kv=args.kv,
        skip=args.skip,
        schedule=args.schedule,
        text_file=args.data,
        seed=args.seed,
        progress=not args.no_progress,
        collect_garbage=not args.no_gc,
        profile=not args.no_profile and not getattr(args, "quick", False),
        modes=list(getattr(args, "modes", None) or DEFAULT_MODES),
        kv_ratios=getattr(args, "kv_ratios", None),
        recent=getattr(args, "recent", None),
        paired_steps=getattr(args, "paired_steps", 0),
        paired_prefills=getattr(args, "paired_prefills", 6),
    )


def load(spec: str | None, dtype: str):
    """``(model, tokenizer, name)`` through the project's loader."""
    from tokenfilter.loading import display_name, load_model

    model, tok = load_model(spec, dtype=dtype)
    return model, tok, display_name(spec)


def resolve_device(text: str | None) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else must be a device torch knows."""
    import torch

    if text in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device must be cpu, cuda, cuda:N or auto, got {text!r}.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no GPU (a CPU build, or no driver).")
    return str(device)


def build_model(args: argparse.Namespace, device: str):
    """``(model, tokenizer, name)``: a random-weight ``--shape`` built on ``device``, or ``--model`` loaded and
    moved there; the dense layers use ``--attn``."""
    if getattr(args, "shape", None):
        if args.model:
            raise ValueError("Give --model or --shape, not both.")
        from tokenfilter.bench import shapes

        model = shapes.build(args.shape, dtype=args.dtype, device=device, layers=args.layers, seed=args.seed)
        layers = model.config.num_hidden_layers
        own = shapes.SHAPES[args.shape]["num_hidden_layers"]
        name = f"random-weight {args.shape} shapes" + ("" if layers == own else f", {layers} of its {own} layers")
        tok = None
    else:
        if getattr(args, "layers", None):
            raise ValueError("--layers scales a --shape down; it does not apply to --model.")
        model, tok, name = load(args.model, args.dtype)
        model = model.to(device)
    model.config._attn_implementation = getattr(args, "attn", "sdpa")
    return model, tok, name


def run(args: argparse.Namespace) -> int:
    if getattr(args, "memory", False):
        from tokenfilter.bench import memory

        threads, _ = choose_threads(getattr(args, "threads", "auto"))
        return memory.run(args, _command_line(), threads)
    from tokenfilter.bench import openmp  # before anything loads torch: OpenMP reads its policy when it loads

    wait_policy = openmp.apply_setting(getattr(args, "omp_wait", "passive"))
    from tokenfilter.bench.malloc import apply_setting
    from tokenfilter.bench.plot import plot_speedup
    from tokenfilter.bench.report import write_docs
    from tokenfilter.bench.runner import run_bench

    threads, why = choose_threads(getattr(args, "threads", "auto"))
    print(f"torch threads: {threads} ({why})", file=sys.stderr)
    allocator = apply_setting(getattr(args, "malloc", "keep"))
    print(f"allocator: {allocator}", file=sys.stderr)
    print(f"OpenMP: {wait_policy}", file=sys.stderr)
    cfg = config_from_args(args)
    command = _command_line()
    what = f"a random-weight {args.shape}" if getattr(args, "shape", None) else (args.model or "the default model")
    t0 = time.perf_counter()
    try:
        device = resolve_device(getattr(args, "device", "auto"))
        print(f"loading {what} on {device} ...", file=sys.stderr)
        model, tok, name = build_model(args, device)
    except ValueError as exc:  # ModelLoadError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"loaded in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    result = run_bench(model, tok, cfg, model_name=name, log=lambda s: print(s, file=sys.stderr))
    result["command"] = command
    result["config"]["threads"] = {"threads": threads, "why": why}
    result["config"]["allocator"] = allocator
    result["config"]["omp_wait"] = wait_policy
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    json_path.write_text(json.dumps(result, indent=1))
    paths = [json_path, plot_speedup(result, out / "speedup.png")]
    if args.write_docs:
        notes = args.notes.read_text() if args.notes else None
        paths += write_docs(result, args.write_docs, notes, command)
    _print_targets(result)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _command_line() -> str:
    argv = sys.argv[1:]
    if "bench" in argv and Path(sys.argv[0]).name.startswith("tokenfilter"):
        return "tokenfilter " + " ".join(shlex.quote(a) for a in argv)
    return "python -m tokenfilter.bench " + " ".join(shlex.quote(a) for a in argv)


def _print_targets(result: dict) -> None:
    for t in result.get("targets", []):
        met = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        worst = t.get("worst")
        worst_txt = "" if worst is None else f" worst {worst:.3f} at {t['where']}"
        print(f"target: {t['target']} ({t['goal']}): {met}{worst_txt}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenfilter.bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
