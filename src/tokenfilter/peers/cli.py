"""``tokenfilter peers``: kvpress presses beside Token Filtering at equal KV held (until the main CLI registers it:
``python -m tokenfilter.peers.cli ...``).

Flow: build the shared inputs (needle cells, MiniLongBench samples, RULER prompts, split into context and question
ids), run ours
(dense and each ratio) here, match every press to each of our rows' KV held per prompt, run the presses in the peer
venv (built on the first run), merge, print the tables, and write the Peers section.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from tokenfilter.cli_args import int_at_least, int_between, names, percents, positive_int, positive_ints, ratios
from tokenfilter.peers import budget as bud
from tokenfilter.peers import env, inputs, merge, report

PEER_SCRIPT = Path(__file__).with_name("peer_script.py")


DTYPES = ("float32", "bfloat16")


def run_name(model_name: str, dtype: str = "float32") -> str:
    """The name a run's JSON records for its model: with the dtype unless float32, so that ``--reuse`` never mixes
    rows measured in two dtypes (and float32 runs written before ``--dtype`` existed still match)."""
    return model_name if dtype == "float32" else f"{model_name} ({dtype})"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--setup", action="store_true", help="build (or rebuild) the peer venv, then stop")
    p.add_argument("--model", default=None, help="built-in name, .gguf file or folder (default: smollm2-135m)")
    p.add_argument("--presses", type=names, default=list(merge.PRESSES),
                   help=f"kvpress classes (default {','.join(merge.PRESSES)})")
    p.add_argument("--ratios", type=ratios, default=[0.5], help="our Token Filtering ratios (default 0.5)")
    p.add_argument("--ours", type=names, default=list(OURS_DEFAULT),
                   help="our rows besides dense: default, default-random, paper, sliding-window, or a KV-side study "
                        "candidate (e.g. kv-w64, the previous default, once named kv-window; kv-w64-g0.99) and its "
                        "-random twin "
                        f"(default {','.join(OURS_DEFAULT)})")
    p.add_argument("--press-budgets", type=names, default=None,
                   help="the rows of --ours whose KV held the presses match (default: all but sliding-window)")
    p.add_argument("--note", action="append", default=[],
                   help="a line for the section's 'What ran' list (e.g. why a grid was reduced); repeatable")
    p.add_argument("--needle-lengths", type=positive_ints, default=[1024, 2048, 4096, 8192],
                   help="default 1024,2048,4096,8192")
    p.add_argument("--needle-depths", type=percents, default=[0, 25, 50, 75, 100], help="default 0,25,50,75,100")
    p.add_argument("--needle-facts", type=int_between(1, 3), default=3,
                   help="held-out needle facts per cell (1-3, default 3)")
    p.add_argument("--tasks", type=names, default=["needle", "longbench"],
                   help="needle, longbench and/or ruler, or LongBench task names (default needle,longbench)")
    p.add_argument("--limit", type=positive_int, default=1, help="MiniLongBench samples per task (default 1)")
    p.add_argument("--max-length", type=positive_int, default=2048,
                   help="MiniLongBench truncation in tokens (default 2048)")
    p.add_argument("--max-new-tokens-cap", type=int_at_least(0, "0 = no cap"), default=64,
                   help="caps LongBench answer lengths (default 64; 0 = no cap)")
    p.add_argument("--ruler-lengths", type=positive_ints, default=[4096], help="RULER prompt lengths (default 4096)")
    p.add_argument("--ruler-samples", type=positive_int, default=2,
                   help="RULER samples per task and length (default 2)")
    p.add_argument("--ruler-tasks", type=names, default=None,
                   help="RULER tasks: names, a prefix (niah, niah_multikey) or all (default all)")
    p.add_argument("--budget", choices=("measured", "nominal"), default="measured",
                   help="our KV held per prompt: from the engine's stats, or 1 - ratio (default measured)")
    p.add_argument("--threads", type=positive_int, default=1, help="CPU threads on both sides (default 1)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="weights and activations on both sides (default float32); a bfloat16 run reuses only "
                        "bfloat16 rows")
    p.add_argument("--reuse", action="store_true",
                   help="keep the rows of an earlier run in --output (same model) and run only the missing ones")
    p.add_argument("--retry-failed", action="store_true",
                   help="with --reuse, run again the press jobs that failed before (by default a failure is kept: "
                        "the same press on the same prompt and versions fails the same way)")
    p.add_argument("--output", type=Path, default=Path("results/peers"), help="folder for the JSON (results/peers)")
    p.add_argument("--results-md", type=Path, default=None, help="write the Peers section of this file")


def _longbench_tasks(tasks: list[str]) -> list[str] | None:
    """None: no LongBench; [] : all English tasks; else the named ones."""
    from tokenfilter.longctx.longbench import ENGLISH_TASKS

    named = [t for t in tasks if t in ENGLISH_TASKS]
    unknown = [t for t in tasks if t not in ENGLISH_TASKS and t not in ("needle", "longbench", "ruler")]
    if unknown:
        raise ValueError(f"Unknown task(s) {unknown}; use needle, longbench, ruler or LongBench task names.")
    if "longbench" in tasks:
        return []
    return named or None


def _model_file(spec: str | None) -> tuple[Path, str]:
    """(path of a .gguf file or a folder, display name)."""
    from tokenfilter import builtin_models

    hit = builtin_models.resolve(spec or builtin_models.DEFAULT)
    if hit is not None:
        return hit
    return Path(spec).expanduser(), str(spec)


def peer_model_spec(path: Path, dtype: str, threads: int) -> dict:
    """The peer script's ``model`` entry for a .gguf file or a folder."""
    gguf = path.suffix == ".gguf"
    return {"path": str(path.parent if gguf else path), "gguf_file": path.name if gguf else None, "dtype": dtype,
            "threads": threads}


def _peer_env(log: object = print) -> env.PeerEnv:
    """The peer venv, built on the first run; a broken one raises ``PeerEnvError`` naming the fix."""
    if env.installed_pins() is None:
        _, seconds = env.setup(log=log)
        log(f"peer venv setup took {seconds:.0f} s")
    return env.check(import_check=True)


def run_peer_script(peer: env.PeerEnv, in_json: Path, out_json: Path) -> dict:
    """Runs ``peer_script.py`` in the peer venv (its progress on our stderr) and returns its JSON."""
    proc = subprocess.run([str(peer.python), str(PEER_SCRIPT), str(in_json), str(out_json)])
    if proc.returncode != 0 or not out_json.exists():
        raise env.PeerEnvError(
            f"The peer script failed (exit {proc.returncode}, see above); if kvpress cannot import, run "
            f"`{env.SETUP_COMMAND}`."
        )
    return json.loads(out_json.read_text(encoding="utf-8"))


# --ours: which of our rows run (dense always does, for the parity check and the plot's origin).
OURS_DEFAULT: tuple[str, ...] = ("default", "default-random", "sliding-window")
OURS_FIXED = {
    "default": "the library default, TokenFilter(ratio=r), whatever it is when the command runs",
    "default-random": "its random twin (score='random', seed 0)",
    "paper": "the paper's reading, TokenFilter.paper(ratio=r)",
    "sliding-window": "TokenFilter.sliding_window sized per prompt to the KV held of the first KV-side row",
}


def ours_choices() -> list[str]:
    """Every name ``--ours`` takes: the fixed ones, each KV-side study candidate and its ``-random`` twin, and the
    older names of these (``presets.ALIASES``, e.g. ``kv-window``)."""
    from tokenfilter.presets import ALIASES, KV_STUDY, RANDOM_SUFFIX

    names = [*OURS_FIXED, *(n for c in KV_STUDY for n in (c, f"{c}{RANDOM_SUFFIX}"))]
    older = [n for a in ALIASES for n in (a, f"{a}{RANDOM_SUFFIX}") if _canonical(n) in map(_canonical, names)]
    return list(dict.fromkeys([*names, *older]))


def _canonical(name: str) -> str:
    from tokenfilter.presets import canonical

    return canonical(name) if name != "sliding-window" else name


def _our_filter(name: str, ratio: float) -> object:
    """The ``TokenFilter`` of a name of ``--ours`` (not dense, not sliding-window) at ``ratio``."""
    from tokenfilter.presets import build

    return build(name, ratio)


def row_name(base: str, ratio: float) -> str:
    base = {"default": "token-filter", "default-random": "token-filter-random"}.get(base, base)
    return f"{base}-{ratio:g}"


def our_methods(ratios: list[float], names: list[str] | tuple[str, ...] = OURS_DEFAULT) -> dict[str, object | None]:
    """Our rows: dense, then at each ratio the ``names`` (see :data:`OURS_FIXED`; any KV-side study candidate, e.g.
    ``kv-w64-g0.99``, and its ``-random`` twin). ``sliding-window`` is a :class:`~tokenfilter.peers.ours.Matched`
    window holding, per prompt, the KV of the first KV-side row of ``names`` that is not a random twin (it runs
    after the others)."""
    from tokenfilter.peers.ours import Matched

    known = ours_choices()
    unknown = [n for n in names if n not in known and n != "dense"]
    if unknown:
        raise ValueError(f"Unknown --ours name(s) {unknown}; choose from {', '.join(known)}.")
    filtered = [n for n in names if n not in ("dense", "sliding-window")]
    kv_side = [n for n in filtered if not n.endswith("-random") and _our_filter(n, 0.5).skip == "none"]
    if "sliding-window" in names and not kv_side:
        raise ValueError("--ours sliding-window needs a KV-side row to match (e.g. default or a study candidate).")
    methods: dict[str, object | None] = {"dense": None}
    for r in ratios:
        methods.update({row_name(n, r): _our_filter(n, r) for n in filtered})
    if "sliding-window" in names:
        for r in ratios:
            methods[row_name("sliding-window", r)] = Matched(reference=row_name(kv_side[0], r))
    return methods


def press_budget_rows(ratios: list[float], names: list[str], budgets: list[str] | None) -> list[str]:
    """The rows of ours whose KV held the presses are matched to: ``budgets`` (base names, from ``--ours``) or, by
    default, every row of ours but dense and the sliding window (which holds another row's KV already)."""
    chosen = [n for n in names if n not in ("dense", "sliding-window")] if budgets is None else list(budgets)
    bad = [b for b in chosen if b not in names or b in ("dense", "sliding-window")]
    if bad:
        raise ValueError(f"--press-budgets {bad} must be rows of --ours ({', '.join(names)}) other than "
                         "dense and sliding-window.")
    return [row_name(b, r) for r in ratios for b in chosen]


def full_grid() -> dict:
    """The command's default grid (what the issue asks for), against which the section says what did not run."""
    from tokenfilter.longctx.longbench import ENGLISH_TASKS
    from tokenfilter.longctx.ruler import TASKS

    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    d = defaults.parse_args([])
    return {"needle_lengths": d.needle_lengths, "needle_depths": d.needle_depths, "needle_facts": d.needle_facts,
            "longbench_tasks": list(ENGLISH_TASKS), "ruler_tasks": list(TASKS)}


def ran_dict(args: argparse.Namespace, prompts: list[inputs.SplitPrompt], budget_rows: list[str]) -> dict:
    """What this table covers (the section's "What ran" list compares it with the command's full grid)."""
    lb = sorted({p.task for p in prompts if p.family == "longbench"})
    rl = [p for p in prompts if p.family == "ruler"]
    return {
        "needle_lengths": sorted({p.meta["length"] for p in prompts if p.family == "needle"}),
        "needle_depths": sorted({p.meta["depth"] for p in prompts if p.family == "needle"}),
        "needle_facts": len({p.meta["needle"] for p in prompts if p.family == "needle"}),
        "needle_prompts": sum(p.family == "needle" for p in prompts),
        "longbench_tasks": lb,
        "longbench_prompts": sum(p.family == "longbench" for p in prompts),
        "longbench_limit": args.limit if lb else None,
        "longbench_max_length": args.max_length if lb else None,
        "ruler_tasks": list(dict.fromkeys(p.task for p in rl)),
        "ruler_lengths": list(dict.fromkeys(p.meta["length"] for p in rl)),
        "ruler_samples": args.ruler_samples if rl else None,
        "ruler_prompts": len(rl),
        "ratios": list(args.ratios),
        "ours": list(args.ours),
        "presses": list(args.presses),
        "press_budgets": budget_rows,
    }


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _load(path: Path, need_weights: bool, dtype: str = "float32") -> tuple[object | None, object, object]:
    """(model or None, tokenizer, config): without ``need_weights`` only the tokenizer and the config load."""
    from tokenfilter.loading import load_model

    if need_weights:
        model, tok = load_model(str(path), dtype=dtype)
        return model, tok, model.config
    from transformers import AutoConfig, AutoTokenizer

    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    folder = str(path.parent if path.suffix == ".gguf" else path)
    return None, AutoTokenizer.from_pretrained(folder, **kwargs), AutoConfig.from_pretrained(folder, **kwargs)


def build_prompts(args: argparse.Namespace, tok: object, positions: int | None) -> list[inputs.SplitPrompt]:
    from tokenfilter.longctx.needle import NEEDLES

    prompts: list[inputs.SplitPrompt] = []
    if "needle" in args.tasks:
        facts = NEEDLES["heldout"][: max(1, min(args.needle_facts, 3))]
        prompts += inputs.needle_prompts(tok, args.needle_lengths, args.needle_depths, facts)
    lb = _longbench_tasks(args.tasks)
    if lb is not None:
        prompts += inputs.longbench_prompts(
            tok, lb or None, args.limit, args.max_length, positions, max_new_tokens_cap=args.max_new_tokens_cap
        )
    if "ruler" in args.tasks:
        prompts += inputs.ruler_prompts(tok, args.ruler_tasks, args.ruler_lengths, args.ruler_samples, positions)
    if not prompts:
        raise ValueError("No prompts: give --tasks needle, longbench and/or ruler.")
    return prompts


def run(args: argparse.Namespace) -> int:
    if args.setup:
        _, seconds = env.setup(force=True)
        print(f"peer venv setup took {seconds:.0f} s ({env.venv_dir()})")
        return 0
    import torch

    from tokenfilter.peers.ours import Matched, run_ours

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    t_start = time.perf_counter()
    peer = _peer_env(log)
    torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    path, model_name = _model_file(args.model)
    model_name = run_name(model_name, args.dtype)
    methods = our_methods(args.ratios, args.ours)
    budget_rows = press_budget_rows(args.ratios, args.ours, args.press_budgets)
    # --reuse: rows of an earlier run of the same model in --output are kept; only the missing ones run.
    old_ours = _read(out / "ours.json") if args.reuse else None
    old_ours = old_ours if old_ours and old_ours.get("model") == model_name else {"rows": []}
    t0 = time.perf_counter()
    _, tok, config = _load(path, need_weights=False)
    prompts = build_prompts(args, tok, getattr(config, "max_position_embeddings", None))
    log(f"{len(prompts)} prompts built ({time.perf_counter() - t0:.0f} s)")
    done = {(r["method"], r["prompt"]): r for r in old_ours["rows"]}
    size = {p.id: p.tokens for p in prompts}
    for key in [k for k, r in done.items() if k[1] in size and r.get("tokens", size[k[1]]) != size[k[1]]]:
        del done[key]  # the same prompt id built to another length (e.g. another --max-length): run it again
    model, element = None, int(old_ours.get("element_size", 4))  # the weights load only if a row is missing
    rows, by_name = [], {}
    for name, method in methods.items():
        if isinstance(method, Matched):  # sized on the reference's KV held, prompt by prompt
            method.held = {r["prompt"]: r["kv_held_share"] for r in by_name[method.reference]}
            for p in prompts:  # a reused window must still hold the reference's KV
                if (name, p.id) in done and done[(name, p.id)].get("recent") != method(p).recent:
                    del done[(name, p.id)]
        else:  # e.g. the library default changed since: the row runs again
            want = None if method is None else repr(method)
            for p in prompts:
                if (name, p.id) in done and done[(name, p.id)].get("filter", want) != want:
                    del done[(name, p.id)]
        todo = [p for p in prompts if (name, p.id) not in done]
        if todo and model is None:
            model, tok, config = _load(path, need_weights=True, dtype=args.dtype)
            element = next(model.parameters()).element_size()
        new = run_ours(model, tok, {name: method}, todo, progress=log)["rows"] if todo else []
        fresh = {r["prompt"]: r for r in new}
        by_name[name] = [fresh.get(p.id) or done[(name, p.id)] for p in prompts]
        rows += by_name[name]
        _save_ours(out, {"model": model_name, "element_size": element, "rows": rows}, done)  # after every row
    ours = {"model": model_name, "element_size": element, "rows": rows}
    shape = bud.ModelShape.from_config(config, element)  # float32 unless the weights said otherwise
    del model
    held: dict[str, dict[str, float]] = {}
    for r in ours["rows"]:
        if r["method"] in budget_rows:
            share = bud.nominal_share(r["ratio"]) if args.budget == "nominal" else r["kv_held_share"]
            held.setdefault(r["method"], {})[r["prompt"]] = share
    by_id = {p.id: p for p in prompts}
    split = [{"id": p.id, "context_ids": p.context_ids, "question_ids": p.question_ids} for p in prompts]
    budgets = bud.match_all(held, split, shape.layers)
    jobs = merge.jobs(budgets, args.presses, by_id)
    peer_out = _run_presses(args, peer, out, path, model_name, prompts, jobs)
    rows = merge.merge(prompts, ours, peer_out, budgets, shape)
    summaries = merge.summarize(rows)
    checks = merge.parity(rows)
    argv = sys.argv[1:]
    argv = argv[1:] if argv[:1] == ["peers"] else argv  # run through the main CLI: its subcommand
    shown = [a for i, a in enumerate(argv) if a != "--note" and (i == 0 or argv[i - 1] != "--note")]
    shown += ["--note", "..."] if args.note else []  # the notes are printed in the section itself
    old_meta = (_read(out / "peers.json") or {}).get("meta", {}) if args.reuse else {}
    invocations = [*old_meta.get("invocations", []), round(time.perf_counter() - t_start, 1)]
    meta = {
        "command": "tokenfilter peers " + " ".join(shlex.quote(a) for a in shown),
        "ran": ran_dict(args, prompts, budget_rows),
        "notes": list(args.note),
        "full_grid": full_grid(),
        "invocations": invocations,
        "model": model_name,
        "versions": peer_out.get("versions"),
        "setup_seconds": env.setup_seconds(),
        "threads": args.threads,
        "dtype": args.dtype,
        "budget_source": (
            "nominal (1 - ratio: a stand-in until the engine's KV-held statistic is wired)"
            if args.budget == "nominal"
            else "measured per prompt from the engine's statistics at the end of the prompt"
        ),
    }
    merged = {
        "meta": meta, "budgets": [b.as_dict() for b in budgets], "rows": rows, "summaries": summaries, "parity": checks
    }
    (out / "peers.json").write_text(json.dumps(merged, indent=1), encoding="utf-8")
    for family in report.FAMILIES:
        if any(s["family"] == family for s in summaries):
            print(f"\n{family}\n" + report.family_table(summaries, family))
    print("\n" + "\n".join(report.parity_lines(checks)))
    if args.results_md:
        report.write_results_section(summaries, checks, meta, args.results_md)
        print(f"wrote the Peers section of {args.results_md}")
    print(f"wrote {out / 'peers.json'}")
    return 0


def _save_ours(out: Path, ours: dict, earlier: dict) -> None:
    """``ours.json``: the rows so far, and the earlier rows outside them (a narrower run loses nothing for later
    ones; a killed run keeps the rows it finished)."""
    current = {(r["method"], r["prompt"]) for r in ours["rows"]}
    kept = [r for key, r in earlier.items() if key not in current]
    (out / "ours.json").write_text(json.dumps({**ours, "rows": ours["rows"] + kept}), encoding="utf-8")


def _interrupted(out: Path, model_spec: dict) -> list[dict]:
    """The results in the peer script's own output (``peer_new.json``, written after every job) when
    its input (``peer_in.json``) was for the same weights in the same dtype (``model_spec``'s path, gguf_file and
    dtype; an input without a dtype was float32): what a killed run leaves."""
    spec, new = _read(out / "peer_in.json"), _read(out / "peer_new.json")
    if not spec or not new:
        return []
    model = {"dtype": "float32", **spec.get("model", {})}
    if any(model.get(k) != model_spec[k] for k in ("path", "gguf_file", "dtype")):
        return []
    return [r for r in new.get("results", []) if "key" in r]


def _run_presses(
    args: argparse.Namespace,
    peer: env.PeerEnv,
    out: Path,
    path: Path,
    model_name: str,
    prompts: list[inputs.SplitPrompt],
    jobs: list[dict],
) -> dict:
    """The peer script's results for ``jobs`` (with ``--reuse``: earlier results of the same job kept)."""
    old = _read(out / "peer_out.json") if args.reuse else None
    old = old if old and old.get("model") == model_name else {"results": []}
    kept = {r["key"]: r for r in old["results"]}
    model_spec = peer_model_spec(path, args.dtype, args.threads)
    if args.reuse:  # a run killed while the peer script ran: the results it had written so far
        for r in _interrupted(out, model_spec):
            if r["key"] not in kept or kept[r["key"]].get("error"):
                kept[r["key"]] = r
    # a failure is kept unless --retry-failed: the same press on the same prompt and versions fails the same way
    usable = {k: r for k, r in kept.items() if not (args.retry_failed and r.get("error"))}
    todo = [j for j in jobs if j["key"] not in usable or usable[j["key"]].get("ratio") != j.get("ratio")]
    new: dict = {"results": [], "versions": old.get("versions")}
    if todo:
        needed = {j["prompt"] for j in todo}
        in_json = inputs.write(out / "peer_in.json", [p for p in prompts if p.id in needed], model_spec, {"jobs": todo})
        new = run_peer_script(peer, in_json, out / "peer_new.json")
    fresh = {r["key"]: r for r in new["results"]}
    results = [fresh.get(j["key"]) or usable[j["key"]] for j in jobs]
    peer_out = {"model": model_name, "versions": new.get("versions") or old.get("versions"), "results": results}
    # the file also keeps earlier results outside these jobs (a narrower run loses nothing for later ones)
    keys = {j["key"] for j in jobs}
    extra = [r for k, r in kept.items() if k not in keys]
    (out / "peer_out.json").write_text(json.dumps({**peer_out, "results": results + extra}), encoding="utf-8")
    for scratch in ("peer_in.json", "peer_new.json"):  # held in peer_out.json now; only a killed run needs them
        (out / scratch).unlink(missing_ok=True)
    return peer_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenfilter peers", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (env.PeerEnvError, ValueError, KeyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
