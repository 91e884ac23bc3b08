"""The benchmark grid: prefill latency, decode throughput and KV-cache bytes, dense vs Token Filtering.

For every context (batch size B, context length T) the methods run interleaved in one process:

* ``dense``: the unmodified model;
* ``overhead``: ``TokenFilter(threshold=2.0)``: the scores are computed but nothing is filtered (a cosine
  similarity never exceeds 1), so the difference to dense is the cost of the filter machinery alone;
* ``filter``: ``TokenFilter(ratio=r)`` for every requested ratio (the query side, the default mode);
* ``kv`` (mode ``kv``): ``TokenFilter(ratio=r, skip="none", recent=R)``, KV-side filtering with a recent window;
* ``window`` (mode ``sliding-window``): ``TokenFilter.sliding_window(recent=R)``, StreamingLLM's rule.

One *trial* of a method is a prefill of the ``[B, T]`` context into an empty ``DynamicCache`` (logits of the
last position only, as ``generate`` does; the time to first token) followed by ``new_tokens`` greedy decode
steps on that cache. After ``warmup`` untimed rounds (once per batch size, on the shortest context: the
process, kernels and allocator are warm after that), ``repeats`` rounds run; in each round every method runs
once, in a rotated order, and each method's time is compared with the dense time of the same round. The
speed ratio reported is the median of these per-round ratios (dense time / method time).

The ideal ratio is what the FLOP model (``tokenfilter.stats``) predicts for the decisions the run actually
made: ``flops_dense / flops_actual``, with the LM head charged only on the rows that are computed (the last
position in prefill). Efficiency is measured / ideal. Decode also gets a byte ideal (``byte_ideal``): the bytes a
step must read, weights once per step plus every key/value entry attended, dense over filtered.

Clocks: on CUDA, CUDA events around prefill and decode (and ``torch.cuda.max_memory_allocated`` per trial); on the
CPU ``time.perf_counter`` and ``time.process_time``, and the process's peak resident memory per trial (Linux:
``/proc/self/clear_refs`` then ``VmHWM``).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from transformers import DynamicCache

from tokenfilter.bench.data import TokenSource
from tokenfilter.bench.kv import KVMeasure, measure_cache
from tokenfilter.bench.paired import paired_overhead
from tokenfilter.config import TokenFilter
from tokenfilter.stats import FilterStats, FlopModel

SCHEMA = "tokenfilter-bench/1"
OVERHEAD_THRESHOLD = 2.0
MODES = ("query", "kv", "sliding-window")


@dataclass
class BenchConfig:
    lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048])
    ratios: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    new_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    max_batch_tokens: int | None = None  # skip (batch, length) cells with batch * length above this
    overhead: bool = True  # also run threshold > 1 (scoring only, nothing filtered)
    kv: str = "drop"
    skip: str = "attention"
    schedule: str = "uniform"  # the library default (from layer 2); "tail-linear": the paper's, from L // 2
    text_file: str | None = None
    seed: int = 0
    progress: bool = True
    profile: bool = True  # a time breakdown by module and an op count for one cell
    profile_length: int | None = None  # default: the largest length <= 1024
    profile_ratio: float = 0.5
    profile_steps: int = 8
    collect_garbage: bool = True  # gc.collect() before every trial (the collector is off while timing)
    modes: list[str] = field(default_factory=lambda: ["query"])  # of MODES
    kv_ratios: list[float] | None = None  # ratios of the KV-side mode (None: the same as ``ratios``)
    recent: int = 64  # the window R of the KV-side mode and of the sliding-window preset
    paired_steps: int = 0  # > 0: the overhead run and the top ratio also paired step by step with dense (steps)
    paired_prefills: int = 6  # prefill pairs of the paired measurement (at 2048+ tokens: half, at least 2)

    def methods(self) -> list[tuple[str, float | None, TokenFilter | None]]:
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise ValueError(f"Unknown bench mode {unknown[0]!r}; use one of {', '.join(MODES)}.")
        out: list[tuple[str, float | None, TokenFilter | None]] = [("dense", None, None)]
        common = dict(kv=self.kv, skip=self.skip, start_layer=self.start_layer)
        if self.overhead:
            out.append(("overhead", None, TokenFilter(threshold=OVERHEAD_THRESHOLD, **common)))
        if "query" in self.modes:
            for r in self.ratios:
                out.append(("filter", float(r), TokenFilter(ratio=float(r), schedule=self.schedule, **common)))
        if "kv" in self.modes:
            for r in self.ratios if self.kv_ratios is None else self.kv_ratios:
                tf = TokenFilter(ratio=float(r), schedule=self.schedule, start_layer=self.start_layer, skip="none",
                                 kv="drop", recent=self.recent)
                out.append(("kv", float(r), tf))
        if "sliding-window" in self.modes:
            out.append(("window", None, TokenFilter.sliding_window(recent=self.recent)))
        return out

    @property
    def start_layer(self) -> int | None:
        return None if self.schedule == "tail-linear" else TokenFilter.start_layer


# -- one trial ------------------------------------------------------------------------------------------
@dataclass
class Trial:
    prefill_s: float
    decode_s: float
    prefill_cpu_s: float
    decode_cpu_s: float
    prefill_stats: FilterStats | None
    decode_stats: FilterStats | None
    kv_prefill: KVMeasure
    kv_peak: KVMeasure
    first_tokens: torch.Tensor
    peak_memory_bytes: int | None = None  # CUDA: max_memory_allocated; CPU (Linux): the process's peak RSS


class Clock:
    """Marks on the timeline of ``device``: CUDA events on a GPU (read after one synchronize), else
    ``time.perf_counter``; ``process_time`` (host CPU time) either way."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.cpu: list[float] = []

    def mark(self) -> None:
        self.cpu.append(time.process_time())
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def spans(self) -> tuple[list[float], list[float]]:
        """``(wall, cpu)`` seconds between consecutive pairs of marks (0-1, 2-3, ...)."""
        if self.cuda:
            torch.cuda.synchronize()
            wall = [self.marks[i].elapsed_time(self.marks[i + 1]) / 1e3 for i in range(0, len(self.marks), 2)]
        else:
            wall = [self.marks[i + 1] - self.marks[i] for i in range(0, len(self.marks), 2)]
        cpu = [self.cpu[i + 1] - self.cpu[i] for i in range(0, len(self.cpu), 2)]
        return wall, cpu


class PeakMemory:
    """Peak memory of one trial: ``torch.cuda.max_memory_allocated`` on CUDA, the process's peak resident set
    (``VmHWM``, reset through ``/proc/self/clear_refs``) on a Linux CPU, else None."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass

    def read(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            with open(f"/proc/{os.getpid()}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return None


def _supports_logits_to_keep(model: torch.nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def run_trial(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    tf: TokenFilter | None,
    new_tokens: int,
    entry_bytes: int,
    logits_to_keep: bool = True,
    collect_garbage: bool = True,
) -> Trial:
    """Prefill ``ids`` (``[B, T]``) into a fresh cache, then ``new_tokens`` greedy decode steps.

    ``mask`` is ``[B, T + new_tokens]`` of ones. Timings exclude the statistics and KV measurements.
    """
    b, t = ids.shape
    cache = DynamicCache(config=model.config)
    extra = {"logits_to_keep": 1} if logits_to_keep else {}
    manager = tf.apply(model) if tf is not None else contextlib.nullcontext()
    clock, peak = Clock(ids.device), PeakMemory(ids.device)
    if collect_garbage:
        gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with manager as run, torch.inference_mode():
            if run is not None:
                run.reset_stats()
            peak.reset()
            clock.mark()
            out = model(input_ids=ids, attention_mask=mask[:, :t], past_key_values=cache, use_cache=True, **extra)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            clock.mark()
            first = nxt.clone()
            prefill_stats = run.stats if run is not None else None
            kv_prefill = measure_cache(cache, entry_bytes)
            if run is not None:
                run.reset_stats()
            del out
            clock.mark()
            for i in range(new_tokens):
                out = model(input_ids=nxt, attention_mask=mask[:, : t + i + 1], past_key_values=cache, use_cache=True)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            clock.mark()
            (prefill_s, decode_s), (prefill_cpu, decode_cpu) = clock.spans()
            peak_bytes = peak.read()
            decode_stats = run.stats if run is not None and new_tokens else None
            kv_peak = measure_cache(cache, entry_bytes)
    finally:
        if gc_was_enabled:
            gc.enable()
    return Trial(prefill_s, decode_s, prefill_cpu, decode_cpu, prefill_stats, decode_stats, kv_prefill, kv_peak,
                 first, peak_bytes)


# -- ideal ratios ----------------------------------------------------------------------------------------
def ideal_ratio(stats: FilterStats | None, fm: FlopModel, head_rows: int | None = None) -> float:
    """``flops_dense / flops_actual`` of a run; ``head_rows``: LM-head rows really computed (None: every token)."""
    if stats is None or stats.flops_actual <= 0:
        return 1.0
    adjust = 0.0 if head_rows is None else (stats.tokens - head_rows) * fm.lm_head
    return (stats.flops_dense - adjust) / (stats.flops_actual - adjust)


def byte_ideal(
    stats: FilterStats | None, fm: FlopModel, weight_bytes: int, element_size: int, batch: int, steps: int
) -> float | None:
    """The decode byte ideal: ``bytes_dense / bytes_actual`` of ``steps`` decode steps, where a step reads every
    weight once (``weight_bytes``, the LM head included, the embedding table not) and every key/value entry it
    attends (one per (query, key) pair and layer). A filtered token saves the read of its Q/O weights (and MLP
    weights with ``skip="block"``); at batch > 1 that read is saved only when the batch's rows skip together,
    which the ideal assumes (``skipped / batch``), so there it is an upper bound."""
    if stats is None or not steps:
        return None
    entry = fm.kv_entry_bytes(element_size)
    qo = 2 * fm.hidden * fm.q_heads * fm.head_dim * element_size
    mlp = 3 * fm.hidden * fm.intermediate * element_size
    pairs = sum(c.pairs for c in stats.layers)
    pairs_dense = sum(c.pairs_dense for c in stats.layers)
    saved_w = sum(c.qo_skipped * qo + c.mlp_skipped * mlp for c in stats.layers) / batch
    dense = steps * weight_bytes + pairs_dense * entry
    actual = steps * weight_bytes - saved_w + pairs * entry
    return dense / actual if actual > 0 else None


def read_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights one decode step reads: every parameter once (a tied LM head counted once), less an
    untied input embedding table (a step reads one row of it)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and (head is None or head.weight is not emb.weight):
        total -= emb.weight.numel() * emb.weight.element_size()
    return total


def _median(xs: Sequence[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


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


# -- the grid -------------------------------------------------------------------------------------------
def model_info(model: torch.nn.Module, name: str | None = None) -> dict:
    cfg = model.config
    fm = FlopModel.from_config(cfg)
    param = next(model.parameters())
    return {
        "name": name or getattr(cfg, "_name_or_path", None) or type(model).__name__,
        "family": getattr(cfg, "model_type", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(param.dtype).replace("torch.", ""),
        "layers": fm.layers,
        "hidden": fm.hidden,
        "q_heads": fm.q_heads,
        "kv_heads": fm.kv_heads,
        "head_dim": fm.head_dim,
        "intermediate": fm.intermediate,
        "vocab": fm.vocab,
        "max_positions": getattr(cfg, "max_position_embeddings", None),
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "device": str(param.device),
        "weight_bytes_read_per_step": read_weight_bytes(model),
        "flops_per_token_no_attention": {
            "qo_proj": fm.qo_proj * fm.layers,
            "kv_proj": fm.kv_proj * fm.layers,
            "mlp": fm.mlp * fm.layers,
            "lm_head": fm.lm_head,
        },
    }


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="bench", unit="trial", dynamic_ncols=True, leave=True)


def run_bench(
    model: torch.nn.Module,
    tokenizer: object | None = None,
    config: BenchConfig | None = None,
    model_name: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run the grid on ``model`` and return the results (JSON-serialisable dict)."""
    from tokenfilter.bench.machine import describe, load_average

    cfg = config or BenchConfig()
    log = log or (lambda s: None)
    started = time.perf_counter()
    model.eval()
    fm = FlopModel.from_config(model.config)
    param = next(model.parameters())
    device = param.device
    machine = describe(device)
    entry_bytes = fm.kv_entry_bytes(param.element_size())
    weight_bytes = read_weight_bytes(model)
    logits_to_keep = _supports_logits_to_keep(model)
    max_pos = getattr(model.config, "max_position_embeddings", None)

    lengths, skipped = [], []
    for t in cfg.lengths:
        if max_pos is not None and t + cfg.new_tokens > max_pos:
            reason = f"{t}+{cfg.new_tokens} new tokens > max_position_embeddings={max_pos}"
            skipped.append({"length": t, "reason": reason})
        else:
            lengths.append(t)
    contexts = []
    for b in cfg.batch_sizes:
        for t in lengths:
            if cfg.max_batch_tokens is not None and b * t > cfg.max_batch_tokens:
                reason = f"{b} x {t} tokens > max_batch_tokens={cfg.max_batch_tokens}"
                skipped.append({"batch": b, "length": t, "reason": reason})
            else:
                contexts.append((b, t))
    needed = max((b * t for b, t in contexts), default=1)
    source = TokenSource.build(tokenizer, needed, model.config.vocab_size, cfg.text_file, cfg.seed)
    methods = cfg.methods()
    rounds = len(contexts) * cfg.repeats + len({b for b, _ in contexts}) * cfg.warmup
    bar = _progress(rounds * len(methods), cfg.progress)

    cells: list[dict] = []
    kv_checks: list[dict] = []
    try:
        for b, t in contexts:
            ids = source.contexts(b, t).to(device)
            mask = torch.ones(b, t + cfg.new_tokens, dtype=torch.long, device=device)
            times: dict[int, dict[str, list[float]]] = {
                i: {"prefill": [], "decode": [], "prefill_cpu": [], "decode_cpu": []} for i in range(len(methods))
            }
            last: dict[int, Trial] = {}
            # warm-up rounds: once per batch size, on its shortest context
            warm = cfg.warmup if t == min(u for c, u in contexts if c == b) else 0
            for rnd in range(warm + cfg.repeats):
                timed = rnd >= warm
                order = list(range(len(methods)))
                shift = rnd % len(order)
                order = order[shift:] + order[:shift]  # rotate, so no method always runs first
                for i in order:
                    name, ratio, tf = methods[i]
                    if bar is not None:
                        label = name if ratio is None else f"ratio {ratio:g}"
                        bar.set_description(f"B={b} T={t} {label}{'' if timed else ' (warm-up)'}")
                    trial = run_trial(
                        model, ids, mask, tf, cfg.new_tokens, entry_bytes, logits_to_keep, cfg.collect_garbage
                    )
                    if timed:
                        times[i]["prefill"].append(trial.prefill_s)
                        times[i]["decode"].append(trial.decode_s)
                        times[i]["prefill_cpu"].append(trial.prefill_cpu_s)
                        times[i]["decode_cpu"].append(trial.decode_cpu_s)
                    last[i] = trial
                    if bar is not None:
                        bar.update(1)
            dense_t = times[0]
            paired: dict[int, dict] = {}
            if cfg.paired_steps:  # the overhead run and the highest query-side ratio, paired with dense
                chosen = [i for i, m in enumerate(methods) if m[0] == "overhead"]
                ratios = [(m[1], i) for i, m in enumerate(methods) if m[0] == "filter"]
                chosen += [max(ratios)[1]] if ratios else []
                pairs = cfg.paired_prefills if t < 2048 else max(2, cfg.paired_prefills // 2)
                for i in chosen:
                    if bar is not None:
                        bar.set_description(f"B={b} T={t} paired {method_label(methods[i][0], methods[i][1], cfg)}")
                    paired[i] = paired_overhead(model, ids, methods[i][2], cfg.paired_steps, pairs, logits_to_keep)
            for i, (name, ratio, tf) in enumerate(methods):
                cell = _cell(b, t, cfg, name, ratio, tf, times[i], dense_t, last[i], last[0], fm, logits_to_keep)
                cell["decode"]["byte_ideal"] = (
                    byte_ideal(last[i].decode_stats, fm, weight_bytes, param.element_size(), b, cfg.new_tokens)
                    if tf is not None else 1.0
                )
                bi, sp = cell["decode"]["byte_ideal"], cell["decode"]["speedup"]
                cell["decode"]["byte_efficiency"] = sp / bi if bi and sp is not None else None
                cell["peak_memory_bytes"] = last[i].peak_memory_bytes
                if i in paired:
                    cell["paired"] = paired[i]
                    sp = 1 / (1 + paired[i]["decode"]["extra"])
                    cell["decode"]["paired_speedup"] = sp
                    ideal = cell["decode"]["ideal"]
                    cell["decode"]["paired_efficiency"] = sp / ideal if ideal else None
                cells.append(cell)
                if name in ("filter", "kv", "window"):
                    kv_checks.append(_kv_check(b, t, cfg, ratio, last[i], last[0], fm, entry_bytes, name))
                log(_cell_line(cell))
    finally:
        if bar is not None:
            bar.close()

    profile = None
    if cfg.profile and lengths and device.type == "cpu":  # host-side hooks: CPU timings only
        from tokenfilter.bench.profile import profile_cell

        p_len = cfg.profile_length or max([t for t in lengths if t <= 1024] or [min(lengths)])
        p_ids = source.contexts(1, p_len).to(device)
        log(f"profiling B=1 T={p_len} ratio {cfg.profile_ratio} ...")
        profile = profile_cell(
            model,
            p_ids,
            TokenFilter(ratio=cfg.profile_ratio, kv=cfg.kv, skip=cfg.skip, schedule=cfg.schedule,
                        start_layer=cfg.start_layer),
            cfg.profile_steps,
            logits_to_keep,
        )

    result = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {**machine, "load_average_at_end": load_average()},
        "model": model_info(model, model_name),
        "config": {
            **{k: v for k, v in asdict(cfg).items() if k not in ("progress",)},
            "overhead_threshold": OVERHEAD_THRESHOLD,
            "inputs": source.kind,
            "prefill_logits": "last position only" if logits_to_keep else "every position",
        },
        "skipped": skipped,
        "cells": cells,
        "kv_checks": kv_checks,
        "profile": profile,
        "elapsed_s": time.perf_counter() - started,
    }
    result["targets"] = evaluate_targets(result)
    return result


def _phase(
    own: list[float],
    dense: list[float],
    ideal: float | None,
    work_units: float,
    own_cpu: list[float] | None = None,
    dense_cpu: list[float] | None = None,
) -> dict:
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


def _cell(
    b: int,
    t: int,
    cfg: BenchConfig,
    name: str,
    ratio: float | None,
    tf: TokenFilter | None,
    times: dict[str, list[float]],
    dense_times: dict[str, list[float]],
    trial: Trial,
    dense_trial: Trial,
    fm: FlopModel,
    logits_to_keep: bool,
) -> dict:
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
        "prefill": _phase(
            times["prefill"], dense_times["prefill"], ideal_p, 0, times["prefill_cpu"], dense_times["prefill_cpu"]
        ),
        "decode": _phase(
            times["decode"],
            dense_times["decode"],
            ideal_d,
            b * cfg.new_tokens,
            times["decode_cpu"],
            dense_times["decode_cpu"],
        ),
        "ideal_from_stats": {
            "prefill": ideal_ratio(trial.prefill_stats, fm) if tf is not None else 1.0,
            "decode": ideal_d,
        },
        "stats_prefill": _stats_summary(trial.prefill_stats),
        "stats_decode": _stats_summary(trial.decode_stats),
        "kv_bytes": {
            "after_prefill_allocated": trial.kv_prefill.allocated_bytes,
            "peak_allocated": trial.kv_peak.allocated_bytes,
            "peak_used": trial.kv_peak.used_bytes,
            "peak_stored_entries": trial.kv_peak.stored_entries,
            "dense_peak_allocated": dense_trial.kv_peak.allocated_bytes,
            "peak_allocated_vs_dense": (
                trial.kv_peak.allocated_bytes / dense_trial.kv_peak.allocated_bytes
                if dense_trial.kv_peak.allocated_bytes
                else None
            ),
        },
        "same_first_token_as_dense": bool(torch.equal(trial.first_tokens, dense_trial.first_tokens)),
    }


def method_label(name: str, ratio: float | None, cfg: BenchConfig) -> str:
    if name == "kv":
        return f"KV side {ratio:g} (R={cfg.recent})"
    if name == "window":
        return f"sliding window (R={cfg.recent})"
    return {"dense": "dense", "overhead": "threshold>1 (overhead)"}.get(name) or f"ratio {ratio:g}"


def _kv_check(
    b: int, t: int, cfg: BenchConfig, ratio: float | None, trial: Trial, dense: Trial, fm: FlopModel, entry_bytes: int,
    trial_method: str = "filter",
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
        "kv": cfg.kv,
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


def _cell_line(cell: dict) -> str:
    p, d = cell["prefill"], cell["decode"]

    def f(x: float | None, spec: str = ".3f") -> str:
        return "-" if x is None else format(x, spec)

    return (
        f"B={cell['batch']} T={cell['length']:>5} {cell['label']:<24} prefill {f(p['median_s'])} s "
        f"x{f(p['speedup'], '.3f')} (ideal {f(p['ideal'], '.3f')})  decode {f(d.get('tokens_per_s'), '.1f')} tok/s "
        f"x{f(d['speedup'], '.3f')} (ideal {f(d['ideal'], '.3f')})"
    )


# -- targets (measured and reported, never asserted) ---------------------------------------------------
def _efficiency(c: dict, phase: str, clock: str) -> float | None:
    """measured / ideal, from the paired measurement where the cell has one (it resolves what 3 rounds cannot)."""
    paired = c.get("paired")
    ideal = c[phase].get("ideal")
    if paired is not None and ideal:
        p = paired[phase] if clock == "" else paired[phase]["cpu"]
        return 1 / (1 + p["extra"]) / ideal if p["extra"] is not None else None
    return c[phase].get(f"{clock}efficiency")


def evaluate_targets(result: dict) -> list[dict]:
    """Each target on wall-clock ratios (``met``, ``worst``) and, as a check against a busy machine, on
    process CPU-time ratios (``met_cpu``, ``worst_cpu``)."""
    cells = result["cells"]
    out: list[dict] = []

    def where(c: dict) -> str:
        return f"B={c['batch']} T={c['length']} {c['label']}"

    def add(name: str, chosen: list[dict], value: Callable[[dict, str], float | None], ok, goal: str) -> None:
        entry: dict = {"target": name, "goal": goal}
        for clock, suffix in (("", ""), ("cpu_", "_cpu")):
            vals = [(where(c), value(c, clock)) for c in chosen]
            vals = [(w, v) for w, v in vals if v is not None]
            if not vals:
                entry.update({f"met{suffix}": None, f"worst{suffix}": None, f"where{suffix}": None})
                entry.setdefault("misses", [])
                continue
            misses = [(w, v) for w, v in vals if not ok(v)]
            worst = min(vals, key=lambda wv: wv[1]) if "<=" not in goal else max(vals, key=lambda wv: wv[1])
            entry.update({f"met{suffix}": not misses, f"worst{suffix}": worst[1], f"where{suffix}": worst[0]})
            entry[f"misses{suffix}"] = [{"where": w, "value": v} for w, v in misses]
            entry[f"values{suffix}"] = [{"where": w, "value": v} for w, v in vals]
        out.append(entry)

    def overhead(phase: str) -> Callable[[dict, str], float | None]:
        def f(c: dict, clock: str) -> float | None:
            paired = c.get("paired")
            if paired is not None:  # the finer measurement, where there is one
                p = paired[phase] if clock == "" else paired[phase]["cpu"]
                return p["extra"]
            s = c[phase].get(f"{clock}speedup")
            return 1 / s - 1 if s else None

        return f

    over = [c for c in cells if c["method"] == "overhead"]
    for phase in ("prefill", "decode"):
        add(f"overhead with nothing filtered, {phase}", over, overhead(phase), lambda v: v <= 0.03,
            "<= 0.03 (fraction of dense time)")
    filt = [c for c in cells if c["method"] == "filter"]
    for phase in ("prefill", "decode"):
        add(
            f"efficiency (measured / ideal) at 2048+ tokens, {phase}",
            [c for c in filt if c["length"] >= 2048],
            lambda c, clock, phase=phase: _efficiency(c, phase, clock),
            lambda v: v >= 0.8,
            ">= 0.8",
        )
    for phase in ("prefill", "decode"):
        add(
            f"not slower than dense (ratio >= 0.3, context >= 1024), {phase}",
            [c for c in filt if c["length"] >= 1024 and (c["ratio"] or 0) >= 0.3],
            lambda c, clock, phase=phase: c[phase].get(f"{clock}speedup"),
            lambda v: v >= 1.0,
            ">= 1.0 (speed ratio)",
        )
    checks = result.get("kv_checks", [])
    out.append(
        {
            "target": "KV bytes saved == dropped entries x entry bytes, exactly",
            "goal": "exact",
            "met": all(k["exact"] for k in checks) if checks else None,
            "worst": None,
            "where": None,
            "misses": [
                {"where": f"B={k['batch']} T={k['length']} {k.get('label') or k['ratio']}",
                 "value": k["saved_bytes_measured"]}
                for k in checks
                if not k["exact"]
            ],
            "values": [],
        }
    )
    return out
