"""Run the long-context benchmarks (needle in a haystack, MiniLongBench) for dense and filtered models.

Example: ``run_longctx(model, tok, {"dense": None, "r0.1": TokenFilter(ratio=0.1)}, limit=1,
output_dir=Path("results/longctx"))`` returns the scores and writes ``longctx.json`` and the heat maps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tokenfilter.config import SlidingWindowShare, for_input
from tokenfilter.longctx import longbench
from tokenfilter.longctx.longbench import ENGLISH_TASKS, Sample
from tokenfilter.longctx.needle import DEFAULT_NEEDLE, Needle, NeedleBuilder, NeedlePrompt, load_haystack_text
from tokenfilter.longctx.plots import needle_heatmap, safe_name

NEEDLE_LENGTHS = (1024, 2048, 4096, 8192)
NEEDLE_DEPTHS = (0, 25, 50, 75, 100)
MAX_LENGTH = 2048  # LongBench truncation on CPU (LongBench uses 3500 for 4k models, 7500 for 8k ones)
MAX_NEW_TOKENS_CAP = 64  # caps LongBench's per-task max new tokens (128..512) to keep CPU runs short
NEEDLE_MAX_NEW_TOKENS = 12
TEMPLATE_MARGIN = 64  # room for the chat template around a truncated LongBench prompt


class FirstLineStop:
    """Stopping criterion: the generated text (leading newlines stripped) has a complete first line."""

    def __init__(self, tokenizer: object, prompt_len: int) -> None:
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: object) -> torch.Tensor:
        text = self.tokenizer.decode(input_ids[0, self.prompt_len :], skip_special_tokens=True)
        done = "\n" in text.lstrip("\n")
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def _eos_ids(model: object, tokenizer: object) -> list[int]:
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        for e in eos if isinstance(eos, list | tuple) else [eos]:
            if e is not None and e not in ids:
                ids.append(int(e))
    return ids


def greedy_ids(
    model: object,
    tokenizer: object,
    input_ids: Sequence[int],
    max_new_tokens: int,
    first_line: bool = False,
    criteria: Sequence[object] = (),
) -> torch.Tensor:
    """The new token ids ``[N]`` of a greedy continuation of one prompt (no padding); ``criteria``: more stopping
    criteria (besides the model's end-of-sequence tokens and, with ``first_line``, the end of the first line)."""
    from transformers import StoppingCriteriaList

    device = next(model.parameters()).device
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    stops = list(criteria) + ([FirstLineStop(tokenizer, ids.shape[1])] if first_line else [])
    eos = _eos_ids(model, tokenizer)
    pad = getattr(tokenizer, "pad_token_id", None)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos or None,
            pad_token_id=pad if pad is not None else (eos[0] if eos else None),
            **({"stopping_criteria": StoppingCriteriaList(stops)} if stops else {}),
        )
    return out[0, ids.shape[1] :]


def greedy(
    model: object, tokenizer: object, input_ids: Sequence[int], max_new_tokens: int, first_line: bool = False
) -> str:
    """Greedy continuation of one prompt (no padding), decoded without special tokens."""
    new = greedy_ids(model, tokenizer, input_ids, max_new_tokens, first_line)
    return tokenizer.decode(new, skip_special_tokens=True)


class PerInput:
    """A method sized on each prompt (a ``SlidingWindowShare``): applied around every answer, its statistics kept
    per prompt. ``answer`` is ``greedy`` under the filter sized to the prompt's length."""

    def __init__(self, model: object, method: SlidingWindowShare) -> None:
        self.model, self.method, self.stats = model, method, []

    def answer(self, tokenizer: object, input_ids: Sequence[int], max_new_tokens: int, first_line: bool = False) -> str:
        with for_input(self.method, len(input_ids), self.model).apply(self.model) as run:
            out = greedy(self.model, tokenizer, input_ids, max_new_tokens, first_line)
        self.stats.append(run.stats.as_dict())
        return out

    def summary(self) -> dict:
        """The mean over prompts of the realized ratio and the KV held (each prompt holds the same share)."""
        n = len(self.stats)
        return {"ratio": sum(s["ratio"] for s in self.stats) / n if n else 0.0, "prompts": n,
                "kv_held_fraction": sum(s["kv_held_fraction"] for s in self.stats) / n if n else 1.0}


def _answerer(model: object, sized: PerInput | None):
    """``(tokenizer, ids, max_new_tokens, first_line) -> answer``: greedy, under ``sized``'s filter if given."""
    if sized is not None:
        return sized.answer
    return lambda tokenizer, ids, n, first_line=False: greedy(model, tokenizer, ids, n, first_line)


def max_positions(model: object) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or None


def clip_lengths(lengths: Sequence[int], limit: int | None) -> list[int]:
    """Needle lengths clipped to ``limit`` (the model's positions minus room to answer), deduplicated."""
    out: list[int] = []
    for n in lengths:
        n = min(int(n), limit) if limit else int(n)
        if n not in out:
            out.append(n)
    return out


# ---- needle in a haystack ------------------------------------------------------------------------
def run_needle(
    model: object,
    tokenizer: object,
    prompts: Sequence[NeedlePrompt],
    needle: Needle | Sequence[Needle] = DEFAULT_NEEDLE,
    max_new_tokens: int = NEEDLE_MAX_NEW_TOKENS,
    progress: bool = True,
    desc: str = "needle",
    sized: PerInput | None = None,
) -> dict:
    """Greedy answers to needle prompts. ``needle``: the fact of every prompt, or one fact per prompt.

    A grid cell (length, depth) scores the mean over the facts planted there; ``mean`` is over all prompts.
    ``sized``: a method applied per prompt (else the caller has applied one, or none).
    """
    answer = _answerer(model, sized)
    needles = [needle] * len(prompts) if isinstance(needle, Needle) else list(needle)
    if len(needles) != len(prompts):
        raise ValueError(f"Give one needle per prompt ({len(prompts)}), got {len(needles)}.")
    cells = []
    for p, fact in tqdm(list(zip(prompts, needles, strict=True)), desc=desc, disable=not progress, leave=False):
        t0 = time.perf_counter()
        output = answer(tokenizer, p.input_ids, max_new_tokens)
        cells.append(
            {
                "length": p.length,
                "depth": p.depth,
                "needle": fact.answer,
                "tokens": len(p.input_ids),
                "actual_depth": round(p.actual_depth, 2),
                "score": fact.score(output),
                "output": output,
                "seconds": round(time.perf_counter() - t0, 2),
            }
        )
    scores: dict[str, dict[str, list[float]]] = {}
    for c in cells:
        scores.setdefault(str(c["length"]), {}).setdefault(f"{c['depth']:g}", []).append(c["score"])
    grid = {n: {d: sum(v) / len(v) for d, v in row.items()} for n, row in scores.items()}
    mean = sum(c["score"] for c in cells) / len(cells) if cells else float("nan")
    return {"mean": mean, "grid": grid, "cells": cells}


# ---- MiniLongBench -------------------------------------------------------------------------------
def longbench_inputs(
    tokenizer: object, tasks: Mapping[str, Sequence[Sample]], max_length: int, positions: int | None
) -> dict[str, list[tuple[Sample, list[int], int]]]:
    """Per task: (sample, input ids, max new tokens), with the truncation length clipped so that the
    input and its answer fit the model's positions."""
    out: dict[str, list[tuple[Sample, list[int], int]]] = {}
    for task, samples in tasks.items():
        new = ENGLISH_TASKS[task].max_new_tokens
        cap = max_length if positions is None else min(max_length, positions - new - TEMPLATE_MARGIN)
        out[task] = [(s, longbench.build_input(tokenizer, s, cap), new) for s in samples]
    return out


def run_longbench(
    model: object,
    tokenizer: object,
    inputs: Mapping[str, Sequence[tuple[Sample, list[int], int]]],
    max_new_tokens_cap: int | None = MAX_NEW_TOKENS_CAP,
    progress: bool = True,
    desc: str = "longbench",
    sized: PerInput | None = None,
) -> dict:
    answer = _answerer(model, sized)
    flat = [(task, item) for task, items in inputs.items() for item in items]
    per_task: dict[str, dict] = {t: {"metric": ENGLISH_TASKS[t].metric, "samples": []} for t in inputs}
    for task, (sample, ids, new) in tqdm(flat, desc=desc, disable=not progress, leave=False):
        budget = min(new, max_new_tokens_cap) if max_new_tokens_cap else new
        t0 = time.perf_counter()
        output = answer(tokenizer, ids, budget, ENGLISH_TASKS[task].first_line)
        per_task[task]["samples"].append(
            {
                "id": sample.id,
                "tokens": len(ids),
                "max_new_tokens": budget,
                "score": longbench.score(sample, output),
                "output": output,
                "seconds": round(time.perf_counter() - t0, 2),
            }
        )
    for entry in per_task.values():
        scores = [s["score"] for s in entry["samples"]]
        entry["n"] = len(scores)
        entry["score"] = 100 * sum(scores) / len(scores) if scores else float("nan")
    done = [e["score"] for e in per_task.values() if e["n"]]
    return {"average": sum(done) / len(done) if done else float("nan"), "tasks": per_task}


# ---- both, per method ----------------------------------------------------------------------------
def _config_dict(method: object) -> dict | None:
    if method is None:
        return None
    if dataclasses.is_dataclass(method):
        record = method.as_record() if hasattr(method, "as_record") else dataclasses.asdict(method)
        return json.loads(json.dumps(record, default=str))
    return {"repr": repr(method)}


def run_longctx(
    model: object,
    tokenizer: object,
    methods: Mapping[str, object | None],
    limit: int = 1,
    output_dir: Path | str | None = None,
    progress: bool = True,
    needle_lengths: Sequence[int] = NEEDLE_LENGTHS,
    needle_depths: Sequence[float] = NEEDLE_DEPTHS,
    max_length: int = MAX_LENGTH,
    *,
    tasks: Sequence[str] | None = None,
    haystack: str | Path | None = None,
    longbench_dir: str | Path | None = None,
    needle: Needle | Sequence[Needle] = DEFAULT_NEEDLE,
    needle_max_new_tokens: int = NEEDLE_MAX_NEW_TOKENS,
    max_new_tokens_cap: int | None = MAX_NEW_TOKENS_CAP,
    benchmarks: Sequence[str] = ("needle", "longbench"),
    previous: Mapping | None = None,
) -> dict:
    """Needle in a haystack and MiniLongBench for each method (``None`` = the dense model).

    ``limit``: samples per LongBench task; ``max_length``: LongBench's middle truncation (tokens);
    ``max_new_tokens_cap``: caps LongBench's per-task answer lengths (None = LongBench's own);
    ``haystack`` / ``longbench_dir``: local data paths (default ``../shared/data/...``);
    ``needle``: one fact, or several (every cell of the grid is asked once per fact, e.g. ``NEEDLES["heldout"]``).
    ``previous``: an earlier result (its ``longctx.json``); a method it holds with the same filter, on the same
    prompts and settings, is kept instead of run again.
    Returns a JSON-able dict; with ``output_dir``, writes ``longctx.json`` (after every method, so an interrupted
    run keeps what it finished) and ``needle_<method>.png``.
    """
    unknown = set(benchmarks) - {"needle", "longbench"}
    if unknown:
        raise ValueError(f"Unknown benchmarks {sorted(unknown)}; use 'needle' and/or 'longbench'.")
    positions = max_positions(model)
    lengths = clip_lengths(needle_lengths, positions - needle_max_new_tokens if positions else None)
    depths = [float(d) for d in needle_depths]
    t_build = time.perf_counter()
    facts = [needle] if isinstance(needle, Needle) else list(needle)
    prompts: list[NeedlePrompt] = []
    prompt_facts: list[Needle] = []
    if "needle" in benchmarks:
        builder = NeedleBuilder(tokenizer, load_haystack_text(haystack), needle=facts[0])
        for fact in facts:
            prompts += builder.for_needle(fact).grid(lengths, depths)
            prompt_facts += [fact] * (len(lengths) * len(depths))
    inputs: dict = {}
    if "longbench" in benchmarks:
        samples = longbench.load_tasks(tasks, longbench_dir, limit)
        inputs = longbench_inputs(tokenizer, samples, max_length, positions)
    result: dict = {
        "config": {
            "limit": limit,
            "needle_lengths": lengths,
            "needle_depths": depths,
            "needle": dataclasses.asdict(facts[0]),
            "needles": [dataclasses.asdict(f) for f in facts],
            "needle_max_new_tokens": needle_max_new_tokens,
            "max_length": max_length,
            "max_new_tokens_cap": max_new_tokens_cap,
            "tasks": list(inputs),
            "benchmarks": list(benchmarks),
            "max_position_embeddings": positions,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "prepare_seconds": round(time.perf_counter() - t_build, 2),
        },
        "methods": {},
        "files": [],
    }
    out_dir = Path(output_dir) if output_dir is not None else None
    kept = reusable_methods(previous, result["config"])
    bar = tqdm(methods.items(), desc="methods", disable=not progress or len(methods) < 2)
    for name, method in bar:
        if name in kept and kept[name].get("filter") == _config_dict(method):
            entry = kept[name]
            result.setdefault("reused", []).append(name)
        else:
            entry = _run_method(model, tokenizer, method, name, prompts, prompt_facts, inputs, progress,
                                needle_max_new_tokens, max_new_tokens_cap)
        result["methods"][name] = entry
        if out_dir is not None and prompts:
            grid = {int(n): {float(d): v for d, v in row.items()} for n, row in entry["needle"]["grid"].items()}
            png = needle_heatmap(grid, lengths, depths, out_dir / f"needle_{safe_name(name)}.png", f"needle: {name}")
            result["files"].append(str(png))
        if out_dir is not None:
            _save(result, out_dir)
    if out_dir is not None:
        result["files"].append(str(out_dir / "longctx.json"))
        _save(result, out_dir)
    return result


def _run_method(
    model: object,
    tokenizer: object,
    method: object | None,
    name: str,
    prompts: Sequence[NeedlePrompt],
    prompt_facts: Sequence[Needle],
    inputs: Mapping,
    progress: bool,
    needle_max_new_tokens: int,
    max_new_tokens_cap: int | None,
) -> dict:
    """One method's needle and LongBench results, its statistics and seconds."""
    t0 = time.perf_counter()
    entry: dict = {"filter": _config_dict(method)}
    sized = PerInput(model, method) if isinstance(method, SlidingWindowShare) else None
    ctx = method.apply(model) if method is not None and sized is None else contextlib.nullcontext()
    with ctx as run:
        if prompts:
            entry["needle"] = run_needle(
                model, tokenizer, prompts, prompt_facts, needle_max_new_tokens, progress, f"needle [{name}]", sized
            )
        if inputs:
            entry["longbench"] = run_longbench(
                model, tokenizer, inputs, max_new_tokens_cap, progress, f"longbench [{name}]", sized
            )
        entry["stats"] = run.stats.as_dict() if run is not None else sized and sized.summary()
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    return entry


# settings that change what a method's scores mean; the others (threads, timings) may differ on a resume
_SAME_RUN_KEYS = ("limit", "needle_lengths", "needle_depths", "needles", "needle_max_new_tokens", "max_length",
                  "max_new_tokens_cap", "tasks", "benchmarks", "max_position_embeddings")


def reusable_methods(previous: Mapping | None, config: Mapping) -> dict:
    """The methods of ``previous`` (an earlier ``run_longctx`` result) measured on the prompts ``config`` describes."""
    if not previous:
        return {}
    old = previous.get("config", {})
    if any(json.loads(json.dumps(old.get(k), default=str)) != json.loads(json.dumps(config.get(k), default=str))
           for k in _SAME_RUN_KEYS):
        return {}
    return dict(previous.get("methods", {}))


def _save(result: Mapping, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "longctx.json").write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")


def summary_table(result: Mapping) -> str:
    """A markdown table: per method, needle mean, LongBench average and per task, realized ratio."""
    methods = result["methods"]
    tasks = list(result["config"]["tasks"])
    head = ["method", "needle", "LongBench avg", *tasks, "realized ratio", "seconds"]
    rows = []
    for name, m in methods.items():
        lb = m.get("longbench", {})
        stats = m.get("stats") or {}
        row = [
            name,
            f"{m['needle']['mean']:.2f}" if "needle" in m else "-",
            f"{lb['average']:.1f}" if lb else "-",
            *[f"{lb['tasks'][t]['score']:.1f}" if lb else "-" for t in tasks],
            f"{stats['ratio']:.3f}" if stats else "0",
            f"{m['seconds']:.0f}",
        ]
        rows.append(row)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
