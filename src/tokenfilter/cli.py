"""``tokenfilter``: the command line. ``tokenfilter eval`` (the main job), ``tokenfilter study`` (which
configuration holds quality), ``tokenfilter bench`` (speed and memory) and ``tokenfilter peers`` (kvpress presses
at equal KV held)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from tokenfilter.cli_args import (
    MODEL_HELP,
    STAGES,
    int_at_least,
    names,
    positive_int,
    positive_ints,
    ratios,
    usable_cores,
)
from tokenfilter.eval.methods import ALL_METHODS as EVAL_METHODS  # imports nothing heavy: --help stays light


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score dense vs Token Filtering vs baselines (lm-eval tasks + perplexity)")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--ratios", type=ratios, default=[0.3, 0.5], help="comma-separated, default 0.3,0.5")
    p.add_argument("--tasks", type=names, default=["zeroshot", "mmlu"],
                   help="boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa,mmlu | zeroshot | all; "
                   "or longctx (needle in a haystack + MiniLongBench, on its own), or ruler (RULER's synthetic tasks, "
                   "on its own)")
    p.add_argument("--limit", type=int_at_least(0, "0 = all"), default=40,
                   help="examples per task (default 40; 0 = all)")
    p.add_argument("--methods", type=names, default=["dense", "token-filter"],
                   help=f"{','.join(EVAL_METHODS)} | all")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="requests scored together (default 8; padding is masked, so scores equal batch 1's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", type=Path, default=Path("results/eval"),
                   help="folder for JSON, Markdown and PNG, and rows/ (the finished parts that --resume reuses)")
    p.add_argument("--results-md", type=Path, default=None, help="also write the Markdown report here")
    p.add_argument("--ppl-file", default=None, help="perplexity text (default ../shared/data/wikitext-2 test)")
    p.add_argument("--ppl-windows", type=positive_int, default=4, help="number of perplexity windows (default 4)")
    p.add_argument("--ppl-window", type=int_at_least(2), default=1024, help="window length in tokens (default 1024)")
    p.add_argument("--no-lambada", action="store_true", help="skip LAMBADA perplexity")
    p.add_argument("--calib-file", default=None, help="calibration text for the layer-removal baseline")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: the cores this process may use; 1 is often faster on a CPU "
                   "shared with other jobs)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue an interrupted run in OUTPUT: reuse its finished (method, ratio, task) results")
    again.add_argument("--force", action="store_true", help="overwrite the results already in OUTPUT")
    p.add_argument("--needle-lengths", type=positive_ints, default=None,
                   help="longctx: needle context lengths (default 1024,2048,4096,8192)")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="longctx: MiniLongBench truncation (default 2048)")
    p.add_argument("--ruler-lengths", type=positive_ints, default=None,
                   help="ruler: prompt lengths in tokens (default 4096; clipped to the model's positions)")
    p.add_argument("--ruler-samples", type=positive_int, default=5,
                   help="ruler: samples per task and length (default 5)")
    p.add_argument("--ruler-tasks", type=names, default=None,
                   help="ruler: niah_single_1,...,vt,cwe, a prefix (niah, niah_multikey) or all (default all)")
    p.add_argument("--ruler-seed", type=int, default=42, help="ruler: the seed of the generated prompts (default 42)")
    p.add_argument("--long-samples", type=int_at_least(0, "0 = no long-input part"), default=1,
                   help="the main job's long-input part: RULER prompts per task, answered by dense and by Token "
                   "Filtering at the highest ratio, KV held beside the scores (default 1; 0 = leave the part out)")
    p.add_argument("--long-length", type=positive_int, default=4096,
                   help="the long-input part's prompt length in tokens (default 4096; clipped to the model's "
                   "positions)")
    p.add_argument("--long-tasks", type=names, default=None,
                   help="the long-input part's RULER tasks (default niah_single_2, niah_multikey_2, niah_multivalue, "
                   "niah_multiquery, vt, cwe)")


def _start_line(args: argparse.Namespace, threads: int, tasks: list[str], methods: list[str]) -> str:
    from tokenfilter.eval.long_part import includes_default

    model = args.model or "the default model (SmolLM2-135M)"
    ratios_text = ", ".join(f"{r:g}" for r in args.ratios)
    long = ""
    if getattr(args, "long_samples", 0) and includes_default(methods) and not {"ruler", "longctx"} & set(args.tasks):
        long = (f"; long inputs: RULER at {args.long_length} tokens, {args.long_samples} per task, dense and "
                f"{max(args.ratios):g}")
    return (f"tokenfilter eval: model {model}; methods {', '.join(methods)}; ratios {ratios_text}; "
            f"tasks {', '.join(tasks)}{long}; threads {threads}; output {args.output}")


def _set_threads(args: argparse.Namespace) -> int:
    import torch

    threads = args.threads or usable_cores()
    torch.set_num_threads(threads)
    return threads


def _run_eval(args: argparse.Namespace) -> int:
    from tokenfilter.loading import model_source

    model_source(args.model)  # a missing path or an unreachable hub id fails here, before the heavy imports
    if "longctx" in args.tasks or "ruler" in args.tasks:
        threads = _set_threads(args)
        print(_start_line(args, threads, args.tasks, args.methods), flush=True)
        return _run_longctx(args) if "longctx" in args.tasks else _run_ruler(args)
    from tokenfilter.eval.harness_tasks import resolve_tasks
    from tokenfilter.eval.long_part import LongPart
    from tokenfilter.eval.methods import resolve_methods
    from tokenfilter.eval.report import PLOT_NAME, print_table, timing_lines, write_markdown, write_outputs
    from tokenfilter.eval.resume import ROWS_DIR, kept_rows
    from tokenfilter.eval.suite import EvalConfig, run_eval
    from tokenfilter.longctx.ruler import resolve_tasks as ruler_tasks

    cfg = EvalConfig(model=args.model, methods=args.methods, ratios=args.ratios, tasks=args.tasks,
                     limit=args.limit or None, batch_size=args.batch_size, dtype=args.dtype, device=args.device,
                     ppl_file=args.ppl_file, ppl_window=args.ppl_window, ppl_windows=args.ppl_windows,
                     lambada=not args.no_lambada, calib_file=args.calib_file,
                     long=LongPart(args.long_samples, args.long_length,
                                   tuple(ruler_tasks(args.long_tasks)) if args.long_tasks else None))
    threads = _set_threads(args)
    print(_start_line(args, threads, resolve_tasks(cfg.tasks), resolve_methods(cfg.methods)), flush=True)
    existing = "resume" if args.resume else "force" if args.force else "refuse"
    try:
        result = run_eval(cfg, output=args.output, existing=existing)
    except KeyboardInterrupt:
        if kept_rows(args.output):
            print(f"\ntokenfilter: interrupted; the finished results so far are kept in {args.output / ROWS_DIR}: "
                  "rerun the same command with --resume to continue from them.", file=sys.stderr)
        else:
            print("\ntokenfilter: interrupted before any result was finished; nothing was kept.", file=sys.stderr)
        return 130
    command = "tokenfilter " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result["command"] = command
    print_table(result)
    print("\n".join(["", *timing_lines(result)]))
    paths = write_outputs(result, args.output, command)
    if args.results_md:
        write_markdown(result, args.results_md, command)  # and its plot beside it
        paths += [args.results_md, args.results_md.parent / PLOT_NAME]
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _longctx_methods(args: argparse.Namespace, group: str) -> dict:
    """The methods of the long-context groups (``longctx``, ``ruler``): dense, the default Token Filtering at each
    ratio, and with ``--methods`` its random twin and the sliding window (sized on each prompt to hold ``1 - ratio``
    of its KV)."""
    from tokenfilter.config import SlidingWindowShare, TokenFilter
    from tokenfilter.eval.methods import filter_for

    if [t for t in args.tasks if t != group]:
        raise ValueError(f"Run --tasks {group} on its own (it is a separate task group).")
    methods: dict[str, TokenFilter | SlidingWindowShare | None] = {"dense": None}
    for ratio in args.ratios:
        methods[f"token-filter-{ratio}"] = filter_for("token-filter", ratio)
        if "random" in args.methods or "all" in args.methods:
            methods[f"random-{ratio}"] = filter_for("random", ratio)
        if "sliding-window" in args.methods or "all" in args.methods:  # sized on each prompt to hold 1 - ratio
            methods[f"sliding-window-{ratio}"] = filter_for("sliding-window", ratio)
    return methods


def _run_ruler(args: argparse.Namespace) -> int:
    """``--tasks ruler``: RULER's synthetic tasks, dense vs Token Filtering (+ its random twin, the sliding window)."""
    from tokenfilter.loading import load_model
    from tokenfilter.longctx import ruler
    from tokenfilter.longctx.ruler_runner import JSON_NAME, build_samples, markdown, run_ruler, saved_result
    from tokenfilter.longctx.runner import max_positions

    methods = _longctx_methods(args, "ruler")
    tasks = ruler.resolve_tasks(args.ruler_tasks)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    samples, chat = build_samples(tok, tasks, args.ruler_lengths or ruler.DEFAULT_LENGTHS, args.ruler_samples,
                                  max_positions(model), args.ruler_seed, progress=True)
    out_dir = args.output / "ruler"
    saved = out_dir / JSON_NAME
    previous = saved_result(out_dir) if args.resume else None
    command = "tokenfilter " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = run_ruler(model, tok, methods, samples, out_dir, seed=args.ruler_seed, chat=chat,
                       previous=previous, command=command)
    if result.get("reused"):
        print(f"reused from {saved}: {', '.join(result['reused'])}")
    print(markdown(result))
    written = list(result["files"])
    if args.results_md:  # its own section of the results file, the others kept
        from tokenfilter.eval.sections import write_section

        write_section(args.results_md, "ruler", markdown(result, "##"))
        written.append(f"the RULER section of {args.results_md}")
    print("wrote " + ", ".join(written))
    return 0


def _run_longctx(args: argparse.Namespace) -> int:
    """``--tasks longctx``: needle in a haystack + MiniLongBench, dense vs Token Filtering (+ the random floor)."""
    import json

    from tokenfilter.loading import load_model
    from tokenfilter.longctx import run_longctx, summary_table

    methods = _longctx_methods(args, "longctx")
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    out_dir = args.output / "longctx"
    extra = {}
    if args.needle_lengths:
        extra["needle_lengths"] = args.needle_lengths
    if args.max_length:
        extra["max_length"] = args.max_length
    saved = out_dir / "longctx.json"
    if args.resume and saved.exists():  # the methods it finished on the same prompts are kept
        extra["previous"] = json.loads(saved.read_text(encoding="utf-8"))
    result = run_longctx(model, tok, methods, limit=args.limit or 1, output_dir=out_dir, **extra)
    if result.get("reused"):
        print(f"reused from {saved}: {', '.join(result['reused'])}")
    print(summary_table(result))
    if args.results_md:
        from tokenfilter.longctx.report import write_results_section

        command = "tokenfilter " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        write_results_section(result, args.results_md, command)
        print(f"wrote the long-context section of {args.results_md}")
    print(f"wrote {out_dir}")
    (out_dir / "command.json").write_text(json.dumps({"argv": sys.argv}), encoding="utf-8")
    return 0


def _add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="which configuration holds quality: choose on one half, report on the other")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--kv-side", action="store_true",
                   help="the KV-side study (Quality II): candidates within the KV budget of ratio 0.5 with a 64-token "
                   "window, chosen by needle hits within the perplexity target, reported on held-out windows and facts")
    p.add_argument("--ratios", type=ratios, default=None,
                   help="default 0.1,0.2,0.3,0.5 (--kv-side: 0.3,0.5,0.7 on the held-out half)")
    p.add_argument("--candidates", type=names, default=None, help="candidate names (default: all; see --list)")
    p.add_argument("--stages", type=names, default=None,
                   help=f"any of {','.join(STAGES)} (default all; --kv-side: select,heldout)")
    p.add_argument("--chosen", default=None, help="--kv-side: skip the choice and report this candidate")
    p.add_argument("--needle-lengths", type=positive_ints, default=None,
                   help="--kv-side: held-out needle context lengths (default 1024,2048,4096)")
    p.add_argument("--twin-needle-lengths", type=positive_ints, default=None,
                   help="--kv-side: needle lengths at the held-out ratios other than 0.5, where the chosen "
                   "configuration meets its random twins only (default 1024)")
    p.add_argument("--no-needle", action="store_true", help="--kv-side: perplexity only on the held-out half")
    p.add_argument("--select-lengths", type=positive_ints, default=None,
                   help="--kv-side: selection needle context lengths (default 1024,2048; answers teacher-forced)")
    p.add_argument("--ppl-windows", type=int_at_least(2, "split even/odd"), default=None,
                   help="WikiText-2 windows, split even/odd (default 12; --kv-side: 16)")
    p.add_argument("--ppl-window", type=int_at_least(2), default=1024)
    p.add_argument("--lambada-windows", type=int_at_least(0), default=4, help="held-out LAMBADA windows (0 = none)")
    p.add_argument("--tasks", type=names, default=None, help="accuracy tasks (default: the zero-shot suite + mmlu)")
    p.add_argument("--acc-docs", type=positive_int, default=30, help="held-out documents per task (default 30)")
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds of the random floor (default 3)")
    p.add_argument("--no-second", action="store_true", help="skip the second real model (stories260K)")
    p.add_argument("--resume", action="store_true", help="keep the stages of OUTPUT/study.json that are not re-run")
    p.add_argument("--output", type=Path, default=Path("results/study"), help="folder for study.json and study.png")
    p.add_argument("--write-docs", nargs="?", const=Path("docs/study.md"), type=Path, default=None,
                   help="also write the Markdown report (default path docs/study.md; the plot goes beside it)")
    p.add_argument("--results-md", type=Path, default=None,
                   help="also write the 'how we chose the defaults' section of this results file")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="--kv-side: the model's dtype (bfloat16 is several times faster on CPUs with AMX)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="FOLDER",
                   help="--kv-side: measure nothing; merge these runs' kv-study.json (e.g. the two halves of a model "
                        "run apart, or two models) into OUTPUT/kv-study.json and render it")
    p.add_argument("--notes", type=Path, default=None,
                   help="--kv-side --merge: a text file of notes for the report (one per paragraph)")
    p.add_argument("--list", action="store_true", help="list the candidates and exit")


def _run_kv_study(args: argparse.Namespace) -> int:
    """``study --kv-side``: the KV-side quality study, saved after every measurement (``--resume`` reuses it)."""
    import json

    from tokenfilter.loading import display_name
    from tokenfilter.study import quality

    if args.list:
        for name, fields in quality.CANDIDATES.items():
            print(f"{name:20s} {fields}")
        return 0
    if args.merge:
        return _merge_kv_study(args)
    # an older name (e.g. kv-window) gives the candidate's own name, the one its recorded runs carry
    args.candidates = args.candidates and [_preset_name(n) for n in args.candidates]
    args.chosen = args.chosen and _preset_name(args.chosen)
    for name in args.candidates or []:
        quality.candidate_fields(name)  # one sentence naming the candidates if unknown
    if args.chosen and args.chosen not in quality.CANDIDATES:
        raise ValueError(f"Unknown KV-side candidate {args.chosen!r}; choose from {', '.join(quality.CANDIDATES)}.")
    cfg = quality.QualityConfig(model=args.model, stages=args.stages or ["select", "heldout"], chosen=args.chosen,
                                seeds=args.seeds, ppl_window=args.ppl_window, ppl_windows=args.ppl_windows or 16,
                                dtype=args.dtype)
    if args.candidates:
        cfg.candidates = args.candidates
    if args.ratios:
        cfg.ratios = args.ratios
    if args.needle_lengths:
        cfg.needle_lengths = args.needle_lengths
    if args.twin_needle_lengths:
        cfg.twin_needle_lengths = args.twin_needle_lengths
    if args.no_needle:
        cfg.needle_lengths = []
    if args.select_lengths:
        cfg.select_lengths = args.select_lengths
    json_path = args.output / "kv-study.json"
    everything = json.loads(json_path.read_text(encoding="utf-8")) if args.resume and json_path.exists() else {}
    models = everything.setdefault("models", {})
    label = display_name(args.model)
    args.output.mkdir(parents=True, exist_ok=True)

    def save(partial: dict) -> None:
        models[label] = partial
        json_path.write_text(json.dumps(everything, indent=1, default=str), encoding="utf-8")

    # recorded before the run, so that the rows of a stopped run name the command that measured them
    everything.setdefault("commands", []).append("tokenfilter " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    result = quality.run_quality(cfg, previous=models.get(label) if args.resume else None, save=save)
    everything["seconds"] = sum(m.get("seconds", 0) for m in models.values())
    everything["torch"], everything["threads"] = result["torch"], result["threads"]
    save(result)
    return _report_kv_study(everything, json_path, args)


def _preset_name(name: str) -> str:
    """The canonical name of a named configuration (``name`` itself when it names none)."""
    from tokenfilter.presets import canonical, is_known

    return canonical(name) if is_known(name) else name


def _report_kv_study(study: dict, json_path: Path, args: argparse.Namespace) -> int:
    """Print the KV-side study's report; write it into ``--write-docs`` and its summary into ``--results-md``."""
    from tokenfilter.eval.sections import write_section
    from tokenfilter.study.quality_report import defaults_summary, render

    text = render(study)
    print(text)
    if args.write_docs:
        write_section(args.write_docs, "kv-study", text)
        print(f"wrote the KV-side section of {args.write_docs}")
    if args.results_md:
        write_section(args.results_md, "study", defaults_summary(study))
        print(f"wrote the 'How we chose the defaults' section of {args.results_md}")
    print(f"wrote {json_path}")
    return 0


def _merge_kv_study(args: argparse.Namespace) -> int:
    """``study --kv-side --merge``: one report from runs made apart (no model is loaded)."""
    import json

    from tokenfilter.study import quality

    parts = {}
    for folder in args.merge:
        path = folder / "kv-study.json" if folder.is_dir() else folder
        if not path.is_file():
            raise FileNotFoundError(f"No KV-side study in {folder}: give a folder that holds a kv-study.json.")
        parts[str(folder)] = json.loads(path.read_text(encoding="utf-8"))
    notes = None
    if args.notes:
        if not args.notes.is_file():
            raise FileNotFoundError(f"No notes file {args.notes}: give a text file, one note per paragraph.")
        text = args.notes.read_text(encoding="utf-8")
        notes = [" ".join(par.split()) for par in text.split("\n\n") if par.strip()]
    merged = quality.merge_results(parts, notes)
    args.output.mkdir(parents=True, exist_ok=True)
    json_path = args.output / "kv-study.json"
    json_path.write_text(json.dumps(merged, indent=1, default=str), encoding="utf-8")
    return _report_kv_study(merged, json_path, args)


def _run_study(args: argparse.Namespace) -> int:
    import json

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.kv_side:
        return _run_kv_study(args)
    args.ratios = args.ratios or [0.1, 0.2, 0.3, 0.5]
    args.stages = args.stages or list(STAGES)
    args.ppl_windows = args.ppl_windows or 12

    from tokenfilter.eval.harness_tasks import resolve_tasks
    from tokenfilter.study import variants
    from tokenfilter.study.report import write_all
    from tokenfilter.study.runner import StudyConfig, run_study

    if args.list:
        for name in variants.all_names():
            print(f"{name:28s} {variants.kwargs_of(name)}")
        return 0
    cfg = StudyConfig(model=args.model, ratios=args.ratios, candidates=args.candidates, stages=args.stages,
                      ppl_window=args.ppl_window, ppl_windows=args.ppl_windows, lambada_windows=args.lambada_windows,
                      acc_docs=args.acc_docs, seeds=args.seeds)
    if args.tasks:
        cfg.tasks = resolve_tasks(args.tasks)
    if args.no_second:
        cfg.second_model = None
    json_path = args.output / "study.json"
    previous = None
    if args.resume and json_path.exists():
        previous = json.loads(json_path.read_text(encoding="utf-8"))
    result = run_study(cfg, previous=previous)
    result.setdefault("commands", []).append("tokenfilter " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    args.output.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1), encoding="utf-8")
    written = [json_path, *write_all(result, args.output, args.write_docs, args.results_md)]
    print((args.output / "study.md").read_text(encoding="utf-8"))
    print("wrote " + ", ".join(map(str, written)))
    return 0


def _command_of(argv: list[str]) -> str | None:
    """The sub-command named in ``argv`` (the first word that is not an option), before parsing."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``tokenfilter`` parser. Only ``bench``'s own options import its package (and torch), so they are
    added only when ``command`` is ``bench``."""
    parser = argparse.ArgumentParser(prog="tokenfilter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_eval(sub)
    _add_study(sub)
    bench = sub.add_parser("bench", help="latency, throughput and KV memory vs dense")
    peers = sub.add_parser("peers", help="NVIDIA kvpress presses beside Token Filtering at equal KV held")
    longgen = sub.add_parser("longgen", help="long generation under a bounded cache: continuation perplexity")
    if command == "longgen":
        from tokenfilter.longctx import longgen_cli

        longgen_cli.add_arguments(longgen)
    if command == "bench":
        from tokenfilter.bench import cli as bench_cli

        bench_cli.add_arguments(bench)
    if command == "peers":
        from tokenfilter.peers import cli as peers_cli

        peers_cli.add_arguments(peers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command_of(argv)).parse_args(argv)
    try:
        if args.command == "eval":
            return _run_eval(args)
        if args.command == "study":
            return _run_study(args)
        if args.command == "peers":
            from tokenfilter.peers import cli as peers_cli

            return peers_cli.run(args)
        if args.command == "longgen":
            from tokenfilter.longctx import longgen_cli

            return longgen_cli.run(args)
        from tokenfilter.bench import cli as bench_cli

        return bench_cli.run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"tokenfilter: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tokenfilter: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
