"""One trial (a prefill into an empty cache, then greedy decode steps), its clocks, and the rounds of a context.

One *trial* of a method is a prefill of the ``[B, T]`` context into an empty ``DynamicCache`` (logits of the
last position only, as ``generate`` does; the time to first token) followed by ``new_tokens`` greedy decode
steps on that cache. After ``warmup`` untimed rounds (once per batch size, on the shortest context: the
process, kernels and allocator are warm after that), ``repeats`` rounds run; in each round every method runs
once, in a rotated order, so that no method always runs first.

Clocks: on CUDA, CUDA events around prefill and decode (and ``torch.cuda.max_memory_allocated`` per trial); on the
CPU ``time.perf_counter`` and ``time.process_time``, and the process's peak resident memory per trial (Linux:
``/proc/self/clear_refs`` then ``VmHWM``).
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import DynamicCache

from tokenfilter.bench.grid import BenchConfig, Method, method_label
from tokenfilter.bench.kv import KVMeasure, measure_cache
from tokenfilter.config import TokenFilter
from tokenfilter.stats import FilterStats


class Progress(Protocol):
    """The part of a ``tqdm`` bar the bench uses."""

    def set_description(self, desc: str) -> None: ...

    def update(self, n: int = 1) -> object: ...


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


@dataclass
class Times:
    """The timed rounds of one method on one context, in seconds (wall clock and process CPU time)."""

    prefill: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)
    prefill_cpu: list[float] = field(default_factory=list)
    decode_cpu: list[float] = field(default_factory=list)

    def add(self, trial: Trial) -> None:
        self.prefill.append(trial.prefill_s)
        self.decode.append(trial.decode_s)
        self.prefill_cpu.append(trial.prefill_cpu_s)
        self.decode_cpu.append(trial.decode_cpu_s)


@dataclass
class Rounds:
    """Every method's timed rounds on one context, and its last trial (for the statistics and the cache)."""

    times: list[Times]  # by method, in the order of ``BenchConfig.methods``
    last: list[Trial]


def run_rounds(
    model: torch.nn.Module,
    ids: torch.Tensor,
    methods: Sequence[Method],
    cfg: BenchConfig,
    warmup: int,
    entry_bytes: int,
    logits_to_keep: bool,
    progress: Progress | None = None,
) -> Rounds:
    """``warmup`` untimed rounds, then ``cfg.repeats`` timed ones; each round runs every method once, the order
    rotated by one method per round."""
    b, t = ids.shape
    mask = torch.ones(b, t + cfg.new_tokens, dtype=torch.long, device=ids.device)
    times = [Times() for _ in methods]
    last: dict[int, Trial] = {}
    for rnd in range(warmup + cfg.repeats):
        timed = rnd >= warmup
        shift = rnd % len(methods)
        for i in [*range(shift, len(methods)), *range(shift)]:
            name, ratio, tf = methods[i]
            if progress is not None:
                label = method_label(name, ratio, cfg)
                progress.set_description(f"B={b} T={t} {label}{'' if timed else ' (warm-up)'}")
            trial = run_trial(model, ids, mask, tf, cfg.new_tokens, entry_bytes, logits_to_keep, cfg.collect_garbage)
            if timed:
                times[i].add(trial)
            last[i] = trial
            if progress is not None:
                progress.update(1)
    return Rounds(times, [last[i] for i in range(len(methods))])
