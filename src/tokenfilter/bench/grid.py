"""What the benchmark measures: its configuration, the methods it compares and the contexts it runs them on.

The methods, for every context (batch size B, context length T):

* ``dense``: the unmodified model;
* ``overhead``: ``TokenFilter(threshold=2.0)``: the scores are computed but nothing is filtered (a cosine
  similarity never exceeds 1), so the difference to dense is the cost of the filter machinery alone;
* ``filter``: ``TokenFilter(ratio=r)`` for every requested ratio (the query side, the default mode);
* ``kv`` (mode ``kv``): ``TokenFilter(ratio=r, skip="none", recent=R)``, KV-side filtering with a recent window;
* ``window`` (mode ``sliding-window``): ``TokenFilter.sliding_window(recent=R)``, StreamingLLM's rule.

The contexts are every (batch size, length) pair, less the lengths the model cannot hold and the pairs over the
token budget (``max_batch_tokens``); what is left out is listed with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from tokenfilter.config import TokenFilter

OVERHEAD_THRESHOLD = 2.0
MODES = ("query", "kv", "sliding-window")


class Method(NamedTuple):
    """One column of the grid: ``name`` (dense, overhead, filter, kv, window), its ratio, its configuration (None:
    dense). A tuple, so ``name, ratio, tf = method`` works."""

    name: str
    ratio: float | None
    tf: TokenFilter | None


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

    def methods(self) -> list[Method]:
        """The methods of every context, dense first."""
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise ValueError(f"Unknown bench mode {unknown[0]!r}; use one of {', '.join(MODES)}.")
        out = [Method("dense", None, None)]
        common = dict(kv=self.kv, skip=self.skip, start_layer=self.start_layer)
        if self.overhead:
            out.append(Method("overhead", None, TokenFilter(threshold=OVERHEAD_THRESHOLD, **common)))
        if "query" in self.modes:
            for r in self.ratios:
                out.append(Method("filter", float(r), TokenFilter(ratio=float(r), schedule=self.schedule, **common)))
        if "kv" in self.modes:
            for r in self.ratios if self.kv_ratios is None else self.kv_ratios:
                tf = TokenFilter(ratio=float(r), schedule=self.schedule, start_layer=self.start_layer, skip="none",
                                 kv="drop", recent=self.recent)
                out.append(Method("kv", float(r), tf))
        if "sliding-window" in self.modes:
            out.append(Method("window", None, TokenFilter.sliding_window(recent=self.recent)))
        return out

    @property
    def start_layer(self) -> int | None:
        return None if self.schedule == "tail-linear" else TokenFilter.start_layer

    def profile_filter(self) -> TokenFilter:
        """The configuration of the profiled cell."""
        return TokenFilter(ratio=self.profile_ratio, kv=self.kv, skip=self.skip, schedule=self.schedule,
                           start_layer=self.start_layer)


def method_label(name: str, ratio: float | None, cfg: BenchConfig) -> str:
    """How a method is named in the results and the report."""
    if name == "kv":
        return f"KV side {ratio:g} (R={cfg.recent})"
    if name == "window":
        return f"sliding window (R={cfg.recent})"
    return {"dense": "dense", "overhead": "threshold>1 (overhead)"}.get(name) or f"ratio {ratio:g}"


@dataclass
class Grid:
    """The contexts a run measures, in order, and what it leaves out."""

    lengths: list[int]  # the requested lengths the model can hold
    contexts: list[tuple[int, int]]  # (batch size, length)
    skipped: list[dict]  # {"length", "reason"} or {"batch", "length", "reason"}

    @property
    def tokens_needed(self) -> int:
        """The most input tokens one context takes."""
        return max((b * t for b, t in self.contexts), default=1)

    def warmup_rounds(self, batch: int, length: int, cfg: BenchConfig) -> int:
        """Untimed rounds before a context: ``cfg.warmup`` on each batch size's shortest context, else none."""
        return cfg.warmup if length == min(t for b, t in self.contexts if b == batch) else 0

    def profile_length(self, cfg: BenchConfig) -> int:
        """The profiled length: ``cfg.profile_length``, else the largest length <= 1024 (else the shortest)."""
        return cfg.profile_length or max([t for t in self.lengths if t <= 1024] or [min(self.lengths)])

    def trials(self, cfg: BenchConfig, methods: int) -> int:
        """Timed and warm-up trials of the whole grid (the progress bar's total)."""
        rounds = len(self.contexts) * cfg.repeats + len({b for b, _ in self.contexts}) * cfg.warmup
        return rounds * methods


def plan_grid(cfg: BenchConfig, max_positions: int | None) -> Grid:
    """Every (batch size, length) of ``cfg`` that fits the model's ``max_positions`` and the token budget."""
    lengths, skipped = [], []
    for t in cfg.lengths:
        if max_positions is not None and t + cfg.new_tokens > max_positions:
            reason = f"{t}+{cfg.new_tokens} new tokens > max_position_embeddings={max_positions}"
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
    return Grid(lengths, contexts, skipped)
