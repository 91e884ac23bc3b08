"""The benchmark grid: prefill latency, decode throughput and KV-cache bytes, dense vs Token Filtering.

``run_bench`` puts the pieces together:

* ``tokenfilter.bench.grid``: the configuration, the methods compared and the contexts measured;
* ``tokenfilter.bench.trial``: one trial (prefill + greedy decode steps), its clocks, and a context's rounds;
* ``tokenfilter.bench.cells``: a context's results, one cell per method (speed ratios against dense of the same
  round, ideals, statistics, cache bytes), the step-by-step pairing with dense, and the exact KV check;
* ``tokenfilter.bench.ideal``: the ideal ratios from the FLOP and byte models;
* ``tokenfilter.bench.targets``: the targets, each with the side that is better;
* ``tokenfilter.bench.model``: what is read off the model.

The names other modules import from here (``BenchConfig``, ``Clock``, ``ideal_ratio``, ``evaluate_targets``, ...)
are re-exported from those modules.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict

import torch

from tokenfilter.bench.cells import Context, cell_line, context_cells, pair_with_dense
from tokenfilter.bench.data import TokenSource
from tokenfilter.bench.grid import (
    METHOD_OF_MODE,
    MODES,
    OVERHEAD_THRESHOLD,
    BenchConfig,
    Grid,
    Method,
    method_label,
    plan_grid,
)
from tokenfilter.bench.ideal import byte_ideal, ideal_ratio
from tokenfilter.bench.model import ModelFacts, model_info, read_weight_bytes
from tokenfilter.bench.targets import evaluate_targets
from tokenfilter.bench.trial import Clock, PeakMemory, Progress, Trial, run_rounds, run_trial

__all__ = [
    "MODES", "OVERHEAD_THRESHOLD", "SCHEMA", "BenchConfig", "Clock", "Method", "PeakMemory", "Trial", "byte_ideal",
    "evaluate_targets", "ideal_ratio", "method_label", "model_info", "read_weight_bytes", "run_bench", "run_trial",
]

SCHEMA = "tokenfilter-bench/1"


def run_bench(
    model: torch.nn.Module,
    tokenizer: object | None = None,
    config: BenchConfig | None = None,
    model_name: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run the grid on ``model`` and return the results (JSON-serialisable dict)."""
    from tokenfilter.bench.machine import STAMP, describe, load_average

    cfg = config or BenchConfig()
    log = log or (lambda s: None)
    started, started_at = time.perf_counter(), time.strftime(STAMP)
    model.eval()
    facts = ModelFacts.read(model)
    machine = describe(facts.device)
    grid = plan_grid(cfg, facts.max_positions)
    source = TokenSource.build(tokenizer, grid.tokens_needed, model.config.vocab_size, cfg.text_file, cfg.seed)
    cells, kv_checks = measure_grid(model, grid, source, cfg, facts, log)
    profile = profile_one_cell(model, grid, source, cfg, facts, log)
    result = {
        "schema": SCHEMA,
        "started": started_at,
        "created": time.strftime(STAMP),
        "machine": {**machine, "load_average_at_end": load_average()},
        "model": model_info(model, model_name),
        "config": _config_section(cfg, source, facts),
        "skipped": grid.skipped,
        "past_positions": grid.past_positions,
        "cells": cells,
        "kv_checks": kv_checks,
        "profile": profile,
        "elapsed_s": time.perf_counter() - started,
    }
    result["targets"] = evaluate_targets(result)
    return result


def measure_grid(
    model: torch.nn.Module,
    grid: Grid,
    source: TokenSource,
    cfg: BenchConfig,
    facts: ModelFacts,
    log: Callable[[str], None],
) -> tuple[list[dict], list[dict]]:
    """``(cells, kv_checks)`` of every context of ``grid``, in order; a line logged per cell."""
    methods = cfg.methods()
    bar = _progress(grid.trials(cfg, len(methods)), cfg.progress)
    cells: list[dict] = []
    kv_checks: list[dict] = []
    try:
        for b, t in grid.contexts:
            ids = source.contexts(b, t).to(facts.device)
            warmup = grid.warmup_rounds(b, t, cfg)
            rounds = run_rounds(model, ids, methods, cfg, warmup, facts.entry_bytes, facts.logits_to_keep, bar)
            paired = pair_with_dense(model, ids, methods, cfg, facts.logits_to_keep, bar)
            new_cells, new_checks = context_cells(Context(b, t, methods, rounds, paired), cfg, facts)
            for cell in new_cells:
                log(cell_line(cell))
            cells += new_cells
            kv_checks += new_checks
    finally:
        if bar is not None:
            bar.close()
    return cells, kv_checks


def profile_one_cell(
    model: torch.nn.Module,
    grid: Grid,
    source: TokenSource,
    cfg: BenchConfig,
    facts: ModelFacts,
    log: Callable[[str], None],
) -> dict | None:
    """The time breakdown of one cell (``tokenfilter.bench.profile``); None unless asked for and on the CPU (its
    host-side hooks time the CPU only)."""
    if not (cfg.profile and grid.lengths and facts.device.type == "cpu"):
        return None
    from tokenfilter.bench.profile import profile_cell

    length = grid.profile_length(cfg)
    ids = source.contexts(1, length).to(facts.device)
    tf = cfg.profile_filter()  # the lead mode's (by default the KV side, the library default)
    label = method_label(METHOD_OF_MODE[cfg.lead_mode], tf.ratio, cfg)
    log(f"profiling B=1 T={length} {label} ...")
    profile = profile_cell(model, ids, tf, cfg.profile_steps, facts.logits_to_keep)
    return {**profile, "mode": cfg.lead_mode, "label": label}


def _config_section(cfg: BenchConfig, source: TokenSource, facts: ModelFacts) -> dict:
    return {
        **{k: v for k, v in asdict(cfg).items() if k not in ("progress",)},
        "overhead_threshold": OVERHEAD_THRESHOLD,
        "lead_mode": cfg.lead_mode,  # the mode of the overhead run, the profiled cell and the paired measurement
        "window": cfg.window,  # the recent window R in effect (``recent``: None = the library's)
        "inputs": source.kind,
        "prefill_logits": "last position only" if facts.logits_to_keep else "every position",
    }


def _progress(total: int, enabled: bool) -> Progress | None:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="bench", unit="trial", dynamic_ncols=True, leave=True)
