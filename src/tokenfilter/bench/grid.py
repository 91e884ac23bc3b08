"""What the benchmark measures: its configuration, the methods it compares and the contexts it runs them on.

The methods, for every context (batch size B, context length T), one group per mode asked for (``--modes``, by
default ``kv``: the library default):

* ``dense``: the unmodified model;
* ``overhead``: the lead mode's configuration (``BenchConfig.lead_mode``: the first of ``query``/``kv`` asked for,
  else ``kv``) at ``threshold=2.0``: the scores are computed on every layer that filters but nothing is filtered (the
  cosine scores never exceed 1), so the difference to dense is the cost of the filter machinery alone; by default
  ``TokenFilter(threshold=2.0)``;
* ``kv`` (mode ``kv``, the default): ``TokenFilter(ratio=r)`` for every ratio, the library default (the KV side:
  ``skip="none"``, ``kv="drop"``, the recent window of 64, the two-horizon score, uniform from layer 2), with only
  ``recent`` and ``schedule`` changed where the bench is given them; labelled ``KV side r (R=64) — the default``;
* ``filter`` (mode ``query``): ``TokenFilter(ratio=r, skip="attention", kv=...)``, the paper's query-side reading;
  labelled ``query side r``;
* ``window`` (mode ``sliding-window``): ``TokenFilter.sliding_window(recent=R)``, StreamingLLM's rule.

The method names (``filter``, ``kv``, ...) are the results' ``method`` keys; the labels name the mode of each row.

The contexts are every (batch size, length) pair, less the lengths the model cannot hold (a context longer than its
``max_position_embeddings``) and the pairs over the token budget (``max_batch_tokens``); what is left out is listed
with the reason. Decode steps may run past ``max_position_embeddings`` (every supported family uses RoPE, computed
per position: the same work at any position); the lengths where they do are listed too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from tokenfilter.config import DEFAULT_RECENT, TokenFilter

OVERHEAD_THRESHOLD = 2.0
MODES = ("query", "kv", "sliding-window")
DEFAULT_MODES = ("kv",)  # the library default, TokenFilter(ratio=r)
RATIO_MODES = ("query", "kv")  # the modes measured at each ratio (one of them leads: see BenchConfig.lead_mode)
METHOD_OF_MODE = {"query": "filter", "kv": "kv", "sliding-window": "window"}  # the results' ``method`` of a mode
SIDE = {"query": "query side", "kv": "KV side"}


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
    overhead: bool = True  # also run threshold > 1 (scoring only, nothing filtered) in the lead mode's configuration
    kv: str = "drop"  # the query mode's (the KV side drops by definition)
    skip: str = "attention"  # the query mode's
    schedule: str = "uniform"  # the library default (from layer 2); "tail-linear": the paper's, from L // 2
    text_file: str | None = None
    seed: int = 0
    progress: bool = True
    profile: bool = True  # a time breakdown by module and an op count for one cell (the lead mode's)
    profile_length: int | None = None  # default: the largest length <= 1024
    profile_ratio: float = 0.5
    profile_steps: int = 8
    collect_garbage: bool = True  # gc.collect() before every trial (the collector is off while timing)
    modes: list[str] = field(default_factory=lambda: list(DEFAULT_MODES))  # of MODES
    kv_ratios: list[float] | None = None  # ratios of the KV-side mode (None: the same as ``ratios``)
    recent: int | None = None  # the window R of the KV side and of the sliding window (None: the library's, 64)
    paired_steps: int = 0  # > 0: the overhead run and the lead mode's top ratio also paired step by step with dense
    paired_prefills: int = 6  # prefill pairs of the paired measurement up to 1024 tokens (cells.prefill_pairs)

    def methods(self) -> list[Method]:
        """The methods of every context, dense first."""
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise ValueError(f"Unknown bench mode {unknown[0]!r}; use one of {', '.join(MODES)}.")
        out = [Method("dense", None, None)]
        if self.overhead:
            out.append(Method("overhead", None, self.overhead_filter()))
        if "query" in self.modes:
            for r in self.ratios:
                out.append(Method("filter", float(r), self.query_filter(ratio=float(r))))
        if "kv" in self.modes:
            for r in self.ratios if self.kv_ratios is None else self.kv_ratios:
                out.append(Method("kv", float(r), self.kv_filter(ratio=float(r))))
        if "sliding-window" in self.modes:
            out.append(Method("window", None, TokenFilter.sliding_window(recent=self.window)))
        return out

    @property
    def start_layer(self) -> int | None:
        return None if self.schedule == "tail-linear" else TokenFilter.start_layer

    @property
    def window(self) -> int:
        """The recent window R in effect (the library's DEFAULT_RECENT unless ``recent`` is given)."""
        return DEFAULT_RECENT if self.recent is None else self.recent

    @property
    def lead_mode(self) -> str:
        """The mode the overhead run, the profiled cell and the paired measurement follow: the first of ``query`` and
        ``kv`` asked for, else ``kv`` (the library default; e.g. ``--modes sliding-window``)."""
        return next((m for m in self.modes if m in RATIO_MODES), "kv")

    def kv_filter(self, **rate: float) -> TokenFilter:
        """The KV side (mode ``kv``) at ``ratio=`` or ``threshold=``: the library default, ``TokenFilter(ratio=r)``,
        with only the bench's ``recent`` and ``schedule`` applied (at their defaults it equals it)."""
        recent = "auto" if self.recent is None else self.recent
        return TokenFilter(**rate, schedule=self.schedule, start_layer=self.start_layer, recent=recent)

    def query_filter(self, **rate: float) -> TokenFilter:
        """The query side (mode ``query``, the paper's reading) at ``ratio=`` or ``threshold=``."""
        if "threshold" in rate:  # (as the overhead run has always been built: no schedule, which thresholds ignore)
            return TokenFilter(**rate, kv=self.kv, skip=self.skip, start_layer=self.start_layer)
        return TokenFilter(**rate, schedule=self.schedule, kv=self.kv, skip=self.skip, start_layer=self.start_layer)

    def mode_filter(self, mode: str, **rate: float) -> TokenFilter:
        """The configuration of ratio mode ``mode`` (``query`` or ``kv``) at ``ratio=`` or ``threshold=``."""
        if mode not in RATIO_MODES:
            raise ValueError(f"{mode!r} is not measured at a ratio; use one of {', '.join(RATIO_MODES)}.")
        return self.query_filter(**rate) if mode == "query" else self.kv_filter(**rate)

    def overhead_filter(self) -> TokenFilter:
        """The overhead run: the lead mode's configuration, nothing filtered (``threshold=2.0``)."""
        return self.mode_filter(self.lead_mode, threshold=OVERHEAD_THRESHOLD)

    def profile_filter(self) -> TokenFilter:
        """The configuration of the profiled cell: the lead mode's at ``profile_ratio``."""
        return self.mode_filter(self.lead_mode, ratio=self.profile_ratio)

    def is_library_default(self, tf: TokenFilter) -> bool:
        """Is ``tf`` exactly ``TokenFilter(ratio=r)`` at its own ratio (the default the library ships)?"""
        return tf.ratio is not None and tf == TokenFilter(ratio=tf.ratio)


def method_label(name: str, ratio: float | None, cfg: BenchConfig) -> str:
    """How a method is named in the results and the report: each row says its mode."""
    if name == "kv":
        default = " — the default" if cfg.is_library_default(cfg.kv_filter(ratio=ratio)) else ""
        return f"KV side {ratio:g} (R={cfg.window}){default}"
    if name == "filter":
        return f"query side {ratio:g}"
    if name == "window":
        return f"sliding window (R={cfg.window})"
    if name == "overhead":
        return f"nothing filtered (scoring only, {SIDE[cfg.lead_mode]})"
    return name


@dataclass
class Grid:
    """The contexts a run measures, in order, and what it leaves out."""

    lengths: list[int]  # the requested lengths the model can hold
    contexts: list[tuple[int, int]]  # (batch size, length)
    skipped: list[dict]  # {"length", "reason"} or {"batch", "length", "reason"}
    past_positions: list[dict] = field(default_factory=list)  # {"length", "note"}: decode runs past the positions

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
    """Every (batch size, length) of ``cfg`` whose context fits the model's ``max_positions`` and the token budget.

    A context of ``max_positions`` tokens is measured (SmolLM2-135M's 8192 with ``--full``): its decode steps run at
    the positions past it, which RoPE (every supported family) computes like any other, so the work is the same;
    such lengths are listed in ``past_positions``."""
    lengths, skipped, past = [], [], []
    for t in cfg.lengths:
        if max_positions is not None and t > max_positions:
            reason = f"{t} tokens > max_position_embeddings={max_positions}"
            skipped.append({"length": t, "reason": reason})
            continue
        lengths.append(t)
        if max_positions is not None and t + cfg.new_tokens > max_positions:
            steps = t + cfg.new_tokens - max_positions
            past.append({"length": t, "note": f"the last {steps} of {cfg.new_tokens} decode steps run at positions "
                         f"past max_position_embeddings={max_positions} (RoPE: the same work per step)"})
    contexts = []
    for b in cfg.batch_sizes:
        for t in lengths:
            if cfg.max_batch_tokens is not None and b * t > cfg.max_batch_tokens:
                reason = f"{b} x {t} tokens > max_batch_tokens={cfg.max_batch_tokens}"
                skipped.append({"batch": b, "length": t, "reason": reason})
            else:
                contexts.append((b, t))
    return Grid(lengths, contexts, skipped, past)
