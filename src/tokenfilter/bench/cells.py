"""The results of one context (batch size B, context length T): a cell per method, and the KV checks.

Each method's time is compared with the dense time of the same round; the speed ratio reported is the median of
these per-round ratios (dense time / method time). With ``paired_steps`` the overhead run and the lead mode's highest
ratio (``BenchConfig.lead_mode``: by default the KV side, the library default) are also measured step by step against
dense (``tokenfilter.bench.paired``), which resolves what a few rounds cannot. The KV check compares the bytes the
measured cache saved with the entries the run says it dropped.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenfilter.bench.grid import METHOD_OF_MODE, BenchConfig, Method, method_label
from tokenfilter.bench.ideal import byte_ideal, ideal_ratio
from tokenfilter.bench.model import ModelFacts
from tokenfilter.bench.paired import paired_overhead
from tokenfilter.bench.trial import Progress, Rounds, Times, Trial
from tokenfilter.stats import FilterStats, FlopModel

KV_CHECKED = ("filter", "kv", "window")  # the methods whose cache is checked against their statistics


@dataclass
class Context:
    """One measured context: its methods, their rounds and the paired measurements (by method index)."""

    batch: int
    length: int
    methods: Sequence[Method]
    rounds: Rounds
    paired: dict[int, dict]


def prefill_pairs(n: int, t: int) -> int:
    """Prefill pairs of the paired measurement at ``t`` tokens for ``--paired-prefills n``: ``n`` up to 1024 tokens,
    then half as many per doubling of the context (a prefill costs about twice as much), at least 2. Short prefills
    are cheap and their ratio the noisiest, so they get the most pairs."""
    return max(2, n * 1024 // max(t, 1024))


def pair_with_dense(
    model: torch.nn.Module,
    ids: torch.Tensor,
    methods: Sequence[Method],
    cfg: BenchConfig,
    logits_to_keep: bool,
    progress: Progress | None = None,
) -> dict[int, dict]:
    """The overhead run and the lead mode's highest ratio (the KV side by default, the query side under ``--modes
    query``), paired step by step with dense (none without ``cfg.paired_steps``); keyed by method index."""
    if not cfg.paired_steps:
        return {}
    b, t = ids.shape
    chosen = [i for i, m in enumerate(methods) if m.name == "overhead"]
    lead = METHOD_OF_MODE[cfg.lead_mode]
    ratios = [(m.ratio, i) for i, m in enumerate(methods) if m.name == lead]
    chosen += [max(ratios)[1]] if ratios else []
    pairs = prefill_pairs(cfg.paired_prefills, t)
    paired = {}
    for i in chosen:
        if progress is not None:
            progress.set_description(f"B={b} T={t} paired {method_label(methods[i].name, methods[i].ratio, cfg)}")
        paired[i] = paired_overhead(model, ids, methods[i].tf, cfg.paired_steps, pairs, logits_to_keep)
    return paired


def context_cells(ctx: Context, cfg: BenchConfig, facts: ModelFacts) -> tuple[list[dict], list[dict]]:
    """``(cells, kv_checks)`` of one context, in the order of the methods."""
    cells, kv_checks = [], []
    dense = ctx.rounds.last[0]
    for i, method in enumerate(ctx.methods):
        cells.append(method_cell(ctx, i, cfg, facts))
        if method.name in KV_CHECKED:
            trial = ctx.rounds.last[i]
            kv_checks.append(
                kv_check(ctx.batch, ctx.length, cfg, method.ratio, trial, dense, facts.fm, facts.entry_bytes,
                         method.name, method.tf.kv)
            )
    return cells, kv_checks


def method_cell(ctx: Context, i: int, cfg: BenchConfig, facts: ModelFacts) -> dict:
    """The result of method ``i`` on ``ctx``: speed ratios against dense, ideals, statistics, cache and memory."""
    tf = ctx.methods[i].tf
    trial = ctx.rounds.last[i]
    cell = _base_cell(ctx.batch, ctx.length, cfg, ctx.methods[i], ctx.rounds.times[i], ctx.rounds.times[0], trial,
                      ctx.rounds.last[0], facts.fm, facts.logits_to_keep)
    decode = cell["decode"]
    decode["byte_ideal"] = (
        byte_ideal(trial.decode_stats, facts.fm, facts.weight_bytes, facts.element_size, ctx.batch, cfg.new_tokens)
        if tf is not None else 1.0
    )
    bi, sp = decode["byte_ideal"], decode["speedup"]
    decode["byte_efficiency"] = sp / bi if bi and sp is not None else None
    cell["peak_memory_bytes"] = trial.peak_memory_bytes
    if i in ctx.paired:
        cell["paired"] = ctx.paired[i]
        sp = 1 / (1 + ctx.paired[i]["decode"]["extra"])
        decode["paired_speedup"] = sp
        decode["paired_efficiency"] = sp / decode["ideal"] if decode["ideal"] else None
    return cell


def _base_cell(
    b: int,
    t: int,
    cfg: BenchConfig,
    method: Method,
    times: Times,
    dense_times: Times,
    trial: Trial,
    dense_trial: Trial,
    fm: FlopModel,
    logits_to_keep: bool,
) -> dict:
    name, ratio, tf = method
    head_rows = b if logits_to_keep else None
    ideal_p = ideal_ratio(trial.prefill_stats, fm, head_rows) if tf is not None else 1.0
    ideal_d = ideal_ratio(trial.decode_stats, fm) if tf is not None else 1.0
    return {
        "batch": b,
        "length": t,
        "new_tokens": cfg.new_tokens,
        "method": name,
        "ratio": ratio,
        "label": method_label(name, ratio, cfg),
        "prefill": _phase(times.prefill, dense_times.prefill, ideal_p, 0, times.prefill_cpu, dense_times.prefill_cpu),
        "decode": _phase(
            times.decode, dense_times.decode, ideal_d, b * cfg.new_tokens, times.decode_cpu, dense_times.decode_cpu
        ),
        "ideal_from_stats": {
            "prefill": ideal_ratio(trial.prefill_stats, fm) if tf is not None else 1.0,
            "decode": ideal_d,
        },
        "stats_prefill": _stats_summary(trial.prefill_stats),
        "stats_decode": _stats_summary(trial.decode_stats),
        "kv_bytes": _kv_bytes(trial, dense_trial),
        "same_first_token_as_dense": bool(torch.equal(trial.first_tokens, dense_trial.first_tokens)),
    }


def _median(xs: Sequence[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


def _phase(
    own: list[float],
    dense: list[float],
    ideal: float | None,
    work_units: float,
    own_cpu: list[float] | None = None,
    dense_cpu: list[float] | None = None,
) -> dict:
    """One phase (prefill or decode) of a cell: times, the speed ratio against dense, the ideal and efficiency."""
    ratios = [d / m for d, m in zip(dense, own, strict=True) if m > 0]
    speed = _median(ratios)
    med = _median(own)
    out = {
        "times_s": own,
        "median_s": med,
        "speedup": speed,
        "speedup_of_medians": (_median(dense) / med) if med else None,
        "speedups": ratios,
        "ideal": ideal,
        "efficiency": (speed / ideal) if speed is not None and ideal else None,
        "gain_captured": ((speed - 1) / (ideal - 1)) if speed is not None and ideal and ideal - 1 > 1e-3 else None,
    }
    if work_units and med:
        out["tokens_per_s"] = work_units / med
    if own_cpu is not None and dense_cpu is not None:
        cpu_ratios = [d / m for d, m in zip(dense_cpu, own_cpu, strict=True) if m > 0]
        cpu_speed = _median(cpu_ratios)
        out["cpu_times_s"] = own_cpu
        out["cpu_median_s"] = _median(own_cpu)
        out["cpu_speedup"] = cpu_speed
        out["cpu_efficiency"] = (cpu_speed / ideal) if cpu_speed is not None and ideal else None
    return out


def _stats_summary(stats: FilterStats | None) -> dict | None:
    if stats is None:
        return None
    return {
        "ratio": stats.ratio,
        "ratio_per_layer": [round(r, 4) for r in stats.ratio_per_layer],
        "tokens": stats.tokens,
        "attention_flops_skipped": stats.attention_flops_skipped,
        "total_flops_skipped": stats.total_flops_skipped,
        "flops_dense": stats.flops_dense,
        "flops_actual": stats.flops_actual,
        "kv_bytes_saved": stats.kv_bytes_saved,
        "kv_bytes_dense": stats.kv_bytes_dense,
        "kv_entries_dropped": sum(c.kv_dropped for c in stats.layers),
    }


def _kv_bytes(trial: Trial, dense: Trial) -> dict:
    dense_peak = dense.kv_peak.allocated_bytes
    return {
        "after_prefill_allocated": trial.kv_prefill.allocated_bytes,
        "peak_allocated": trial.kv_peak.allocated_bytes,
        "peak_used": trial.kv_peak.used_bytes,
        "peak_stored_entries": trial.kv_peak.stored_entries,
        "dense_peak_allocated": dense_peak,
        "peak_allocated_vs_dense": trial.kv_peak.allocated_bytes / dense_peak if dense_peak else None,
    }


def kv_check(
    b: int, t: int, cfg: BenchConfig, ratio: float | None, trial: Trial, dense: Trial, fm: FlopModel, entry_bytes: int,
    trial_method: str = "filter",
    kv: str | None = None,
) -> dict:
    """Do the bytes saved in the measured cache equal the entries the run says it dropped, exactly?"""
    dense_entries = b * (t + cfg.new_tokens) * fm.layers
    dropped = sum(
        sum(c.kv_dropped for c in s.layers) for s in (trial.prefill_stats, trial.decode_stats) if s is not None
    )
    saved_stats = sum(s.kv_bytes_saved for s in (trial.prefill_stats, trial.decode_stats) if s is not None)
    stored = trial.kv_peak.stored_entries
    measured_saved_bytes = dense.kv_peak.used_bytes - trial.kv_peak.used_bytes
    exact = (
        dense.kv_peak.stored_entries == dense_entries
        and dense_entries - stored == dropped
        and measured_saved_bytes == saved_stats
        and measured_saved_bytes == dropped * entry_bytes
    )
    return {
        "batch": b,
        "length": t,
        "ratio": ratio,
        "kv": kv or cfg.kv,  # the method's own (the query side's --kv; the KV side always drops)
        "label": method_label(trial_method, ratio, cfg),
        "entry_bytes": entry_bytes,
        "dense_entries": dense_entries,
        "dense_entries_measured": dense.kv_peak.stored_entries,
        "stored_entries": stored,
        "dropped_entries_reported": dropped,
        "saved_bytes_measured": measured_saved_bytes,
        "saved_bytes_reported": saved_stats,
        "saved_fraction": measured_saved_bytes / dense.kv_peak.used_bytes if dense.kv_peak.used_bytes else 0.0,
        "dense_allocated_bytes": dense.kv_peak.allocated_bytes,
        "filtered_allocated_bytes": trial.kv_peak.allocated_bytes,
        "filtered_layers_allocated_bytes": trial.kv_peak.filtered_layers_allocated_bytes,
        "filtered_layers_used_bytes": trial.kv_peak.filtered_layers_stored_entries * entry_bytes,
        "exact": exact,
    }


def cell_line(cell: dict) -> str:
    """One line of progress log for a cell."""
    p, d = cell["prefill"], cell["decode"]

    def f(x: float | None, spec: str = ".3f") -> str:
        return "-" if x is None else format(x, spec)

    return (
        f"B={cell['batch']} T={cell['length']:>5} {cell['label']:<34} prefill {f(p['median_s'])} s "
        f"x{f(p['speedup'], '.3f')} (ideal {f(p['ideal'], '.3f')})  decode {f(d.get('tokens_per_s'), '.1f')} tok/s "
        f"x{f(d['speedup'], '.3f')} (ideal {f(d['ideal'], '.3f')})"
    )
