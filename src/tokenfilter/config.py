"""The one configuration object, and the verb that applies it: ``TokenFilter(...).apply(model)``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from tokenfilter.algorithm.schedule import SCHEDULE_ERROR, SCHEDULES
from tokenfilter.algorithm.scores import FUSIONS, SCORES
from tokenfilter.presets import PAPER_READING, QUERY_SIDE, SPEC_SCORE  # noqa: F401  (named configurations: presets)
from tokenfilter.presets import sliding_window as sliding_window_fields

if TYPE_CHECKING:
    from tokenfilter.integration.run import FilterRun


DEFAULT_RECENT = 64  # the recent window of the KV side (issue 15: 64 keeps x1.06 dense perplexity at ratio 0.5)
# under a KV budget, recent="auto" is this share of the budget: the latest tokens take three quarters of what a layer
# holds, the score chooses the older quarter. Chosen on selection texts of two models (docs/long-generation.md,
# "Choosing the budget's window"): the 64-token window lost to StreamingLLM everywhere; 0.75 was the best share or
# within 0.05 perplexity of it at every budget and text
BUDGET_RECENT_SHARE = 0.75
# fields added after results were recorded (docs/*.json, kept rows): left out of repr() and as_record() while they hold
# these defaults, so a recorded run still matches the filter it ran and --resume / --reuse keep it
LATER_FIELDS = {"granularity": "token", "budget": None}


@dataclass(frozen=True)
class TokenFilter:
    """Token Filtering configuration (see SPEC.md for every choice).

    Set exactly one of ``ratio`` (target fraction of (real token, layer) attention computations skipped,
    over all layers), ``threshold`` (fixed score threshold: one number, or one per layer with ``None``
    for layers that never filter) or ``budget``.

    ``budget=N`` bounds the cache instead: each filtered layer (the schedule's, from ``start_layer``) holds at most N
    entries per sequence, the ``warmup`` sinks and the recent window (``recent - 1`` entries) included. Nothing is
    decided when a token arrives; when a key leaves the recent window and the layer would hold more than N, the held
    key with the highest redundancy score leaves for good (its score as it arrived; between equal scores the older
    leaves first, so a constant score gives StreamingLLM's window), and the sinks and the window never do. Each row
    of a batch keeps its own N (padding is never held). A query reads what its layer holds when it arrives, so a
    prefill reads as a token-by-token decode would, and chunked calls as one call. KV side only, per token.
    ``run.stats.peak_held_per_layer`` reports the most entries a layer held for one sequence after any call. With
    ``recent="auto"`` the window is three quarters of the budget (``BUDGET_RECENT_SHARE``): the latest tokens take
    most of what a layer holds and the score chooses which older ones stay; a window of 64 lost to StreamingLLM.

    The defaults come from the quality studies (``tokenfilter study``, docs/study.md), chosen on selection data
    and reported on held-out data, on two models:

    * ``skip="none"`` (KV-side filtering): a filtered token still attends, but its key and value are not kept
      for later tokens; ``recent`` (``"auto"``: 64 on the KV side; 3/4 of a budget) keeps the R most recent real
      tokens readable whatever their decision (SPEC, "KV-side filtering", "Recent window"). The paper's query-side
      reading, ``skip="attention"`` (its Q projection, attention and O projection skipped; ``"block"``: the MLP
      too), costs x25 dense perplexity at ratio 0.5 where the KV side with its window costs x1.06 (SmolLM2-135M).
    * the ``uniform`` schedule from layer 2, which loses far less than the SPEC's ``tail-linear`` ramp from
      ``L // 2``.
    * ``score="two-horizon"`` with ``fusion="key"`` and ``gamma=0.95``: a token is filtered only when its key is
      redundant both with the recent past (the EMA anchor) and with the whole past (the cumulative mean), averaged
      over heads; values do not vote. The SPEC's score (``similarity``, K and V, variance fusion, gamma 0.9: the
      ``SPEC_SCORE`` fields) keeps the needle in 1 of 18 selection prompts at ratio 0.5, this one in 14 (dense 14).

    ``granularity="head"`` lets each KV head rank and keep its own tokens (the ratio then counts (token, layer, head)
    entries; each head's score is its own similarity, so no fusion across heads is needed). It runs on the reference
    attention backend (``path="reference"``, which masks instead of gathering; the fast one falls back to it, with a
    warning) and is measured in docs/study.md.

    ``path`` names the attention backend (``integration/backends/``): ``"fast"`` computes only what is read,
    ``"reference"`` masks every column (the definition the tests hold the others to).

    ``TokenFilter.paper(...)`` pins the paper's own reading (query side, tail-linear from ``L // 2``, no window)
    so that a default never changes it.
    """

    ratio: float | None = None
    threshold: float | Sequence[float | None] | None = None
    budget: int | None = None
    gamma: float = 0.95
    warmup: int = 4
    fusion: Literal["variance", "mean", "key", "value", "min", "key-min", "kv-min"] = "key"
    lam: float = 1.0
    schedule: str | Sequence[float] = "uniform"
    start_layer: int | None = 2  # None: the SPEC's L // 2
    max_layer_ratio: float = 0.95
    skip: Literal["attention", "block", "none"] = "none"
    kv: Literal["drop", "keep"] = "drop"
    recent: int | Literal["auto"] | None = "auto"  # "auto": DEFAULT_RECENT on the KV side, no window otherwise
    pre_rope: bool = True
    score: str = "two-horizon"  # a name in tokenfilter.algorithm.scores.SCORES
    granularity: Literal["token", "head"] = "token"  # "head": each KV head ranks and keeps its own tokens
    seed: int = 0
    record_decisions: bool = False
    path: str = "fast"  # a name in tokenfilter.integration.backends.BACKENDS
    enabled: bool = True

    @classmethod
    def paper(cls, **kwargs: object) -> TokenFilter:
        """The SPEC's (paper's) own reading, pinned so that a new default never changes it: the ``tail-linear``
        schedule from layer ``L // 2``, the query-side skip, filtered entries dropped, no recent window, the SPEC's
        score (EMA similarity of K and V, variance fusion, gamma 0.9)."""
        return cls(**{**PAPER_READING, **kwargs})

    @classmethod
    def sliding_window(cls, recent: int, warmup: int = 4, **kwargs: object) -> TokenFilter:
        """StreamingLLM's rule (``warmup`` attention sinks + the ``recent`` latest tokens), as the limiting case of
        the same engine: every real token past warm-up is filtered at every layer (no score: ``constant`` under
        ``threshold=-inf``; the ratio rule caps below 1), on the KV side, so each query reads the sinks and its
        band only. Prefill and decode read alike, and KV held is ``warmup + recent - 1`` entries per layer."""
        return cls(**{**sliding_window_fields(recent, warmup), **kwargs})

    @classmethod
    def sliding_window_holding(
        cls, held: float, length: int, warmup: int = 4, windows: Sequence[int | None] | None = None, **kwargs: object
    ) -> TokenFilter:
        """The sliding window (``warmup`` sinks + recent tokens) that holds a share ``held`` of the KV of a
        ``length``-token input: the engine holds ``warmup + recent - 1`` entries per layer. ``windows``: each
        layer's own window (``families.layer_windows``); where a layer has one, the share is of what the unmodified
        model holds there (its latest ``window - 1`` entries), as ``kv_held_fraction`` counts it."""
        if windows is None or all(w is None for w in windows):
            return cls.sliding_window(recent=max(1, round(held * length) - warmup + 1), warmup=warmup, **kwargs)
        dense = sum(layer_held(length, length + 1, 0, w) for w in windows)
        recent = _closest(lambda r: sum(layer_held(length, r, warmup, w) for w in windows) / dense, held, length)
        return cls.sliding_window(recent=recent, warmup=warmup, **kwargs)

    @classmethod
    def sliding_window_pairing(
        cls, pairs: float, length: int, warmup: int = 4, windows: Sequence[int | None] | None = None, **kwargs: object
    ) -> TokenFilter:
        """The sliding window that computes a share ``pairs`` of the causal attention pairs of a ``length``-token
        prefill (the window with the closest share; ties to the smaller window): equal attention work, where
        ``sliding_window_holding`` gives equal KV. ``windows`` as there: the share is of the pairs the unmodified
        model computes (its own window caps them)."""
        if not 0 < pairs <= 1:
            raise ValueError(f"pairs must be in (0, 1], got {pairs}.")
        ws = list(windows) if windows is not None else [None]
        dense = sum(layer_pairs(length, length, 0, w) for w in ws)
        recent = _closest(lambda r: sum(layer_pairs(length, r, warmup, w) for w in ws) / dense, pairs, length)
        return cls.sliding_window(recent=recent, warmup=warmup, **kwargs)

    def __post_init__(self) -> None:
        if self.budget is not None:
            self._check_budget()
        if self.ratio is not None and self.threshold is not None:
            raise ValueError("Set either ratio or threshold, not both.")
        if self.ratio is None and self.threshold is None and self.budget is None:
            if not isinstance(self.schedule, str):
                object.__setattr__(self, "ratio", sum(self.schedule) / len(self.schedule))
            else:
                raise ValueError("Set ratio (e.g. TokenFilter(ratio=0.5)) or threshold.")
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, int | float) or math.isnan(self.ratio):
                raise ValueError(f"ratio must be a number in [0, 1), got {self.ratio!r}.")
            if not 0 <= self.ratio < 1:
                raise ValueError(f"ratio must be in [0, 1), got {self.ratio}.")
        if self.threshold is not None and not isinstance(self.threshold, int | float):
            for t in self.threshold:
                if t is not None and not isinstance(t, int | float):
                    raise ValueError(f"Every per-layer threshold must be a number or None, got {t!r}.")
        if not 0 <= self.gamma < 1:
            raise ValueError(f"gamma must be in [0, 1), got {self.gamma}.")
        if not isinstance(self.warmup, int) or self.warmup < 1:
            raise ValueError(f"warmup must be an integer >= 1 (the first token seeds the anchors), got {self.warmup}.")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}.")
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}.")
        if isinstance(self.schedule, str) and self.schedule not in SCHEDULES:
            raise ValueError(SCHEDULE_ERROR.format(schedule=self.schedule))
        if not isinstance(self.schedule, str):
            object.__setattr__(self, "schedule", tuple(float(r) for r in self.schedule))
            if self.ratio is not None and abs(sum(self.schedule) / len(self.schedule) - self.ratio) > 1e-6:
                raise ValueError("With an explicit per-layer schedule, ratio must equal its mean (or be left out).")
        if self.start_layer is not None and self.start_layer < 0:
            raise ValueError(f"start_layer must be >= 0, got {self.start_layer}.")
        if not 0 < self.max_layer_ratio <= 1:
            raise ValueError(f"max_layer_ratio must be in (0, 1], got {self.max_layer_ratio}.")
        if self.ratio is not None and self.ratio > self.max_layer_ratio:
            raise ValueError(
                f"ratio={self.ratio} is above max_layer_ratio={self.max_layer_ratio}; lower the ratio or raise the cap."
            )
        for name, allowed in (
            ("skip", ("attention", "block", "none")),
            ("kv", ("drop", "keep")),
            ("score", tuple(SCORES)),
            ("path", _backend_names()),
            ("granularity", ("token", "head")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}.")

        if self.skip == "none" and self.kv == "keep":
            raise ValueError(
                'kv="keep" keeps the entries of filtered tokens, which the KV side (skip="none", the default) drops by '
                'definition: use it with skip="attention".'
            )
        if self.recent is not None and self.recent != "auto":
            if isinstance(self.recent, bool) or not isinstance(self.recent, int) or self.recent < 1:
                raise ValueError(f'recent must be an integer >= 1, "auto" or None, got {self.recent!r}.')
            if self.skip != "none":
                raise ValueError(
                    f'recent (a window of recent keys) needs skip="none" (KV-side filtering), got skip={self.skip!r}.'
                )

        if self.granularity == "head" and self.skip != "none":
            raise ValueError(
                f'granularity="head" (per-KV-head decisions) needs skip="none" (KV-side filtering), got '
                f"skip={self.skip!r}."
            )

    def _check_budget(self) -> None:
        if self.ratio is not None or self.threshold is not None:
            raise ValueError("Set one of ratio, threshold or budget, not several.")
        if isinstance(self.budget, bool) or not isinstance(self.budget, int):
            raise ValueError(f"budget must be a whole number of entries per layer, got {self.budget!r}.")
        if self.skip != "none" or self.granularity != "token":
            raise ValueError('budget bounds the KV cache: use it with skip="none" and granularity="token".')
        floor = self.warmup + (self.window or 1) - 1
        if self.budget < floor:
            raise ValueError(
                f"budget={self.budget} is below the {floor} entries a layer always holds (warmup {self.warmup} + "
                f"recent window {self.window or 1} - 1); raise the budget or lower recent."
            )

    @property
    def window(self) -> int | None:
        """The recent window in effect: ``recent``, with ``"auto"`` resolved: DEFAULT_RECENT on the KV side; under a
        budget, ``BUDGET_RECENT_SHARE`` of it (at most what the budget leaves after the sinks)."""
        if self.recent == "auto":
            if self.budget is not None:  # a whole number by now: _check_budget checks the type before it asks
                return max(1, min(round(BUDGET_RECENT_SHARE * self.budget), self.budget - self.warmup + 1))
            return DEFAULT_RECENT if self.skip == "none" else None
        return self.recent

    @property
    def mode(self) -> Literal["ratio", "threshold", "budget"]:
        if self.budget is not None:
            return "budget"
        return "ratio" if self.ratio is not None else "threshold"

    def as_record(self) -> dict:
        """The fields as a JSON-ready dict, as results record the filter they ran (``LATER_FIELDS`` at their
        defaults left out)."""
        record = dataclasses.asdict(self)
        if self.budget is not None and self.recent == "auto":  # "auto" meant 64 here before: record the window
            record["recent"] = self.window
        for name, default in LATER_FIELDS.items():
            if record[name] == default:
                del record[name]
        return record

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.as_record().items())
        return f"{type(self).__name__}({fields})"

    def replace(self, **changes: object) -> TokenFilter:
        """A copy with some fields changed (``dataclasses.replace``)."""
        modes = ("ratio", "threshold", "budget")
        for name in modes:  # asking for one mode leaves the others
            if changes.get(name) is not None:
                changes.update({other: None for other in modes if other != name and other not in changes})
        return dataclasses.replace(self, **changes)

    def apply(self, model: object) -> FilterRun:
        """Patch ``model`` for the duration of a ``with`` block; the returned run carries stats and decisions."""
        from tokenfilter.integration.run import FilterRun

        return FilterRun(self, model)


def _backend_names() -> tuple[str, ...]:
    from tokenfilter.integration.backends import BACKENDS  # the engine: imported when a filter is made, not before

    return tuple(BACKENDS)


@dataclass(frozen=True)
class SlidingWindowShare:
    """A sliding window sized per input: ``for_length(n)`` holds a share ``held`` of an ``n``-token input's KV.

    A fixed window holds a different share of every prompt; this keeps the share (the budget) equal instead, so
    it can stand beside a ratio on inputs of any length (``eval``'s ``sliding-window`` method)."""

    held: float
    warmup: int = 4

    def __post_init__(self) -> None:
        if not 0 < self.held <= 1:
            raise ValueError(f"held must be in (0, 1], got {self.held}.")

    def for_length(self, length: int, windows: Sequence[int | None] | None = None) -> TokenFilter:
        return TokenFilter.sliding_window_holding(self.held, length, self.warmup, windows)


def _closest(share: Callable[[int], float], target: float, length: int) -> int:
    """The window ``recent`` in ``[1, length]`` whose ``share(recent)`` (non-decreasing) is closest to ``target``;
    ties to the smaller window."""
    lo, hi = 1, max(1, length)
    while lo < hi:  # the smallest window reaching at least the target
        mid = (lo + hi) // 2
        if share(mid) < target:
            lo = mid + 1
        else:
            hi = mid
    return min((r for r in (lo - 1, lo) if r >= 1), key=lambda r: abs(share(r) - target))


def layer_held(length: int, recent: int, warmup: int, window: int | None) -> int:
    """Entries one layer holds after a ``length``-token prefill under the sliding window (``warmup`` sinks + the
    band of ``recent``), on a layer whose own window is ``window`` (None: full attention), where what the layer's
    window has passed is let go (a band wider than it acts as it). ``recent = length + 1, warmup = 0``: dense."""
    r = recent if window is None else min(recent, window)
    lo = 0 if window is None else max(0, length - (window - 1))  # the oldest entry the layer's window still reads
    band = length - max(lo, length - r + 1, 0)
    sinks = max(0, min(warmup, length - r + 1) - lo)
    return max(band, 0) + sinks


def layer_pairs(length: int, recent: int, warmup: int, window: int | None) -> int:
    """Causal (query, key) pairs of a ``length``-token prefill on one layer under the sliding window, capped by the
    layer's own ``window`` (None: full attention). ``recent = length, warmup = 0``: dense."""
    if window is None:
        return sliding_window_pairs(length, recent, warmup)
    import torch

    r = min(recent, window)
    t = torch.arange(length)
    first_sink = (t - window + 1).clamp(min=0)  # query t reads key j when t - j < window
    last_sink = (t - r).clamp(max=warmup - 1)  # ... and a sink only when it is older than the band
    return int(((t + 1).clamp(max=r) + (last_sink - first_sink + 1).clamp(min=0)).sum())


def sliding_window_pairs(length: int, recent: int, warmup: int) -> int:
    """Causal (query, key) pairs of a ``length``-token prefill under ``warmup`` sinks and a band of ``recent``
    tokens: query ``t`` reads its band ``min(t + 1, recent)`` and the sinks older than the band."""
    # band: sum over k = 1..length of min(k, recent); sinks: sum over k = 1..length - recent of min(k, warmup)
    return _sum_capped(length, recent) + _sum_capped(length - recent, warmup)


def _sum_capped(n: int, cap: int) -> int:
    """``sum(min(k, cap) for k in range(1, n + 1))`` in closed form (0 when ``n <= 0``)."""
    if n <= 0 or cap <= 0:
        return 0
    m = min(n, cap)
    return m * (m + 1) // 2 + (n - m) * cap


def for_input(token_filter: TokenFilter | SlidingWindowShare, length: int, model: object = None) -> TokenFilter:
    """The ``TokenFilter`` to apply to an input of ``length`` tokens (a ``SlidingWindowShare`` is sized to it, on
    ``model``'s own layer windows where given)."""
    if not isinstance(token_filter, SlidingWindowShare):
        return token_filter
    from tokenfilter.integration.families import layer_windows

    return token_filter.for_length(length, None if model is None else layer_windows(model))
