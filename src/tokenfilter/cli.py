"""``tokenfilter``: the command line. ``tokenfilter eval`` (the main job) and ``tokenfilter bench``."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    for v in values:
        if not 0 <= v < 1:
            raise argparse.ArgumentTypeError(f"every ratio must be in [0, 1), got {v}")
    return values


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score dense vs Token Filtering vs baselines (lm-eval tasks + perplexity)")
    p.add_argument("--model", default=None, help="local folder, .gguf file or hub id (default: SmolLM2-135M)")
    p.add_argument("--ratios", type=_floats, default=[0.3, 0.5], help="comma-separated, default 0.3,0.5")
    p.add_argument("--tasks", type=_names, default=["zeroshot", "mmlu"],
                   help="boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa,mmlu | zeroshot | all; "
                   "or longctx (needle in a haystack + MiniLongBench, on its own)")
    p.add_argument("--limit", type=int, default=40, help="examples per task (default 40; 0 = all)")
    p.add_argument("--methods", type=_names, default=["dense", "token-filter"],
                   help="dense,token-filter,fusion-mean,fusion-key,fusion-value,kv-keep,uniform,post-rope,random,"
                   "shortgpt,shortgpt-calib2 | all")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", type=Path, default=Path("results/eval"), help="folder for JSON, Markdown and PNG")
    p.add_argument("--results-md", type=Path, default=None, help="also write the Markdown report here")
    p.add_argument("--ppl-file", default=None, help="perplexity text (default ../shared/data/wikitext-2 test)")
    p.add_argument("--ppl-windows", type=int, default=4, help="number of perplexity windows (default 4)")
    p.add_argument("--ppl-window", type=int, default=1024, help="window length in tokens (default 1024)")
    p.add_argument("--no-lambada", action="store_true", help="skip LAMBADA perplexity")
    p.add_argument("--calib-file", default=None, help="calibration text for the layer-removal baseline")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is often faster on a CPU shared with other jobs)")


def _run_eval(args: argparse.Namespace) -> int:
    from tokenfilter.eval.report import print_table, write_markdown, write_outputs
    from tokenfilter.eval.suite import EvalConfig, run_eval

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if "longctx" in args.tasks:
        return _run_longctx(args)
    cfg = EvalConfig(model=args.model, methods=args.methods, ratios=args.ratios, tasks=args.tasks,
                     limit=args.limit or None, batch_size=args.batch_size, dtype=args.dtype, device=args.device,
                     ppl_file=args.ppl_file, ppl_window=args.ppl_window, ppl_windows=args.ppl_windows,
                     lambada=not args.no_lambada, calib_file=args.calib_file)
    result = run_eval(cfg)
    command = "tokenfilter " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result["command"] = command
    print_table(result)
    paths = write_outputs(result, args.output, command)
    if args.results_md:
        write_markdown(result, args.results_md, command)
        paths.append(args.results_md)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _run_longctx(args: argparse.Namespace) -> int:
    """``--tasks longctx``: needle in a haystack + MiniLongBench, dense vs Token Filtering (+ the random floor)."""
    import json

    from tokenfilter.config import TokenFilter
    from tokenfilter.loading import load_model
    from tokenfilter.longctx import run_longctx, summary_table

    if [t for t in args.tasks if t != "longctx"]:
        raise ValueError("Run --tasks longctx on its own (it is a separate task group).")
    methods: dict[str, TokenFilter | None] = {"dense": None}
    for ratio in args.ratios:
        methods[f"token-filter-{ratio}"] = TokenFilter(ratio=ratio)
        if "random" in args.methods or "all" in args.methods:
            methods[f"random-{ratio}"] = TokenFilter(ratio=ratio, score="random")
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    out_dir = args.output / "longctx"
    result = run_longctx(model, tok, methods, limit=args.limit or 1, output_dir=out_dir)
    print(summary_table(result))
    if args.results_md:
        args.results_md.parent.mkdir(parents=True, exist_ok=True)
        args.results_md.write_text("# Long-context results\n\n" + summary_table(result) + "\n", encoding="utf-8")
    print(f"wrote {out_dir}")
    (out_dir / "command.json").write_text(json.dumps({"argv": sys.argv}), encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenfilter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_eval(sub)
    bench = sub.add_parser("bench", help="latency, throughput and KV memory vs dense")
    try:
        from tokenfilter.bench import cli as bench_cli
    except ImportError:
        bench_cli = None
    else:
        bench_cli.add_arguments(bench)
    args = parser.parse_args(argv)
    try:
        if args.command == "eval":
            return _run_eval(args)
        if bench_cli is None:
            print("tokenfilter bench is not available in this version.", file=sys.stderr)
            return 2
        return bench_cli.run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"tokenfilter: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
