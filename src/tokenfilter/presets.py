"""Every named Token Filtering configuration, one name each, as plain ``TokenFilter`` keyword arguments (no ``ratio``).

eval, study, peers and the CLI read their named configurations here; this module imports nothing heavy (no torch,
and ``tokenfilter.config`` only inside :func:`build`), so ``tokenfilter --help`` and the registries cost nothing.

* ``PRESETS``: canonical name -> fields. A configuration's fields are written here and nowhere else.
* ``ALIASES``: an older name -> the canonical name of the same configuration. Command lines and recorded rows
  (docs/*.json, kept rows of ``--resume`` / ``--reuse``) still give these names; the tools accept them and label
  rows with the name they were given, so recorded rows keep matching.
* ``<name>-random``: the random twin of any named configuration (``score="random"``, seed 0), not listed.
* ``SLIDING_WINDOW``: StreamingLLM's rule (``TokenFilter.sliding_window``), sized by a window, not by a ratio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenfilter.config import SlidingWindowShare, TokenFilter

# the SPEC's (paper's) score: EMA-anchor cosine of keys and values, variance-aware fusion over heads
SPEC_SCORE = {"score": "similarity", "fusion": "variance", "gamma": 0.9, "warmup": 4}
QUERY_SIDE = {"skip": "attention", "recent": None, **SPEC_SCORE}  # the paper's query-side skip, with no window
PAPER_READING = {**QUERY_SIDE, "kv": "drop", "schedule": "tail-linear", "start_layer": None}  # TokenFilter.paper
# the query-side reading with the library's schedule (uniform from layer 2), pinned
QUERY_SIDE_UNIFORM = {**QUERY_SIDE, "schedule": "uniform", "start_layer": 2}
KV_SIDE = {"skip": "none", "kv": "drop", **SPEC_SCORE}  # the KV-side study changes the SPEC's score, not the default's
TWO_HORIZON_KEY = {**KV_SIDE, "recent": 64, "score": "two-horizon", "fusion": "key"}  # the KV-side study's 2nd family
# StreamingLLM's rule as the engine's limiting case: every token past warm-up filtered at every layer, no score
SLIDING_WINDOW = {"threshold": float("-inf"), "score": "constant", "start_layer": 0, "skip": "none", "kv": "drop"}

RANDOM_SUFFIX = "-random"
SIZED_PER_INPUT = ("sliding-window",)  # sized on every input to hold 1 - ratio of its KV (SlidingWindowShare)

# the library's own configurations and eval's ablations
LIBRARY: dict[str, dict] = {
    "token-filter": {},  # the library default, whatever it is when a run starts
    "random": {"score": "random"},  # the default's random twin (the floor)
    "paper": PAPER_READING,  # TokenFilter.paper: query side, tail-linear from L // 2, no window
    "query-side": QUERY_SIDE_UNIFORM,  # the query-side skip with our schedule (the default before the KV side)
    "query-side-kv-keep": {**QUERY_SIDE_UNIFORM, "kv": "keep"},
    "spec-score": SPEC_SCORE,  # the default with the SPEC's score
    "spec-fusion-mean": {**SPEC_SCORE, "fusion": "mean"},
    "spec-fusion-key": {**SPEC_SCORE, "fusion": "key"},
    "spec-fusion-value": {**SPEC_SCORE, "fusion": "value"},
    "post-rope-keys": {"pre_rope": False},  # the default scoring keys after RoPE
    "kv-side": {"skip": "none", "recent": None},  # the default without its recent window
}

# the query-side study (``tokenfilter study``): changes from the SPEC's reading (PAPER_READING and the field defaults:
# variance fusion, lam 1, gamma 0.9, warm-up 4, pre-RoPE keys), every one pinned to the query side
QUERY_STUDY: dict[str, dict] = {
    "kv-keep": {**PAPER_READING, "kv": "keep"},
    "skip-block": {**PAPER_READING, "skip": "block"},
    "fusion-mean": {**PAPER_READING, "fusion": "mean"},
    "fusion-key": {**PAPER_READING, "fusion": "key"},
    "fusion-value": {**PAPER_READING, "fusion": "value"},
    "lam-0": {**PAPER_READING, "lam": 0.0},
    "lam-3": {**PAPER_READING, "lam": 3.0},
    "gamma-0.5": {**PAPER_READING, "gamma": 0.5},
    "gamma-0.98": {**PAPER_READING, "gamma": 0.98},
    "warmup-32": {**PAPER_READING, "warmup": 32},
    "post-rope": {**PAPER_READING, "pre_rope": False},
    "tail-from-2": {**QUERY_SIDE, "schedule": "tail-linear", "start_layer": 2},
    "tail-from-2-kv-keep": {**QUERY_SIDE, "schedule": "tail-linear", "start_layer": 2, "kv": "keep"},
}

# the KV-side study (``tokenfilter study --kv-side``); every candidate fits the budget at ratio 0.5 (window <= 64)
KV_STUDY: dict[str, dict] = {
    "kv-w64": {**KV_SIDE, "recent": 64},  # the previous default
    "kv-w64-g0.99": {**KV_SIDE, "recent": 64, "gamma": 0.99},
    "kv-w64-cummean": {**KV_SIDE, "recent": 64, "score": "cumulative-mean"},
    "kv-w64-cummean-min": {**KV_SIDE, "recent": 64, "score": "cumulative-mean", "fusion": "min"},
    "kv-w64-cummean-key": {**KV_SIDE, "recent": 64, "score": "cumulative-mean", "fusion": "key"},
    "kv-w64-cummean-keymin": {**KV_SIDE, "recent": 64, "score": "cumulative-mean", "fusion": "key-min"},
    "kv-w64-2h-key": TWO_HORIZON_KEY,
    "kv-w64-2h-key-g0.8": {**TWO_HORIZON_KEY, "gamma": 0.8},
    "kv-w64-2h-key-g0.95": {**TWO_HORIZON_KEY, "gamma": 0.95},
    "kv-w64-2h-key-wu16": {**TWO_HORIZON_KEY, "warmup": 16},
    "kv-w64-2h-key-g0.95-wu16": {**TWO_HORIZON_KEY, "gamma": 0.95, "warmup": 16},
    "kv-w64-2h-key-from3": {**TWO_HORIZON_KEY, "start_layer": 3},
    "kv-w64-2h-key-g0.95-from3": {**TWO_HORIZON_KEY, "gamma": 0.95, "start_layer": 3},
    # the layer-schedule axis: PyramidKV's shape (more KV kept low, less high), and its mirror sparing the late layers
    "kv-w64-2h-key-g0.95-tail": {**TWO_HORIZON_KEY, "gamma": 0.95, "schedule": "tail-linear"},
    "kv-w64-2h-key-g0.95-front": {**TWO_HORIZON_KEY, "gamma": 0.95, "schedule": "front-linear"},
    # the granularity axis: each KV head ranks and keeps its own tokens by its own key's two-horizon cosine
    "kv-w64-2h-key-g0.95-head": {**TWO_HORIZON_KEY, "gamma": 0.95, "granularity": "head", "path": "reference"},
    "kv-w64-2h-mean": {**KV_SIDE, "recent": 64, "score": "two-horizon", "fusion": "mean"},
    "kv-w64-key": {**KV_SIDE, "recent": 64, "fusion": "key"},
    # the values alone (the ladder: on Gemma 3, one KV head and QK-norm, the keys alone pick worse than chance)
    "kv-w64-value": {**KV_SIDE, "recent": 64, "fusion": "value"},
    "kv-w64-2h-value": {**TWO_HORIZON_KEY, "gamma": 0.95, "fusion": "value"},
    # filtered only when the key and the value both repeat the past (on both horizons)
    "kv-w64-2h-kvmin": {**TWO_HORIZON_KEY, "gamma": 0.95, "fusion": "kv-min"},
    # the key and the value each standardized over the tokens seen so far, so neither one's scale decides
    "kv-w64-2h-zmin": {**TWO_HORIZON_KEY, "gamma": 0.95, "score": "standardized-min"},
    "kv-w64-2h-zmean": {**TWO_HORIZON_KEY, "gamma": 0.95, "score": "standardized-mean"},
    "kv-w64-2h-zmin-prefix": {**TWO_HORIZON_KEY, "gamma": 0.95, "score": "standardized-min-prefix"},
    "kv-w64-cummean-post": {**KV_SIDE, "recent": 64, "score": "cumulative-mean", "pre_rope": False},
    "kv-w64-2h": {**KV_SIDE, "recent": 64, "score": "two-horizon"},
    "kv-w64-2h-g0.99": {**KV_SIDE, "recent": 64, "score": "two-horizon", "gamma": 0.99},
    "kv-w64-min": {**KV_SIDE, "recent": 64, "fusion": "min"},
    "kv-w64-keynorm": {**KV_SIDE, "recent": 64, "score": "key-norm"},
    "kv-w64-valnorm": {**KV_SIDE, "recent": 64, "score": "value-norm"},
    "kv-w32": {**KV_SIDE, "recent": 32},
    "kv-w64-from0": {**KV_SIDE, "recent": 64, "start_layer": 0},
}

PRESETS: dict[str, dict] = {**LIBRARY, **QUERY_STUDY, **KV_STUDY}  # the three share no name (tests/test_presets.py)

# older name -> canonical name, one line each (the same configuration, so recorded rows and command lines still work)
ALIASES: dict[str, str] = {
    "default": "token-filter",  # peers --ours
    "token-filter-random": "random",  # peers' row label of default-random
    "kv-window": "kv-w64",  # eval --methods, peers --ours (kv-w64: the KV-side study's name, in docs/kv-study.json)
    "uniform-from-2": "query-side",  # the query-side study's label (docs/study.md)
    "uniform-from-2-kv-keep": "query-side-kv-keep",  # the query-side study's label; eval's former kv-keep
}


def canonical(name: str) -> str:
    """The canonical name of ``name`` (a preset, an alias, or ``<either>-random``); ``KeyError`` if unknown."""
    name = ALIASES.get(name, name)
    if name in PRESETS:
        return name
    base = name.removesuffix(RANDOM_SUFFIX)
    if base == name:
        raise KeyError(name)
    twin = canonical(base) + RANDOM_SUFFIX
    return ALIASES.get(twin, twin)


def is_known(name: str) -> bool:
    try:
        canonical(name)
    except KeyError:
        return False
    return True


def random_twin(fields: dict, seed: int = 0) -> dict:
    """The same configuration with a random choice of tokens (the floor that isolates the score)."""
    return {**fields, "score": "random", "seed": seed}


def fields(name: str) -> dict:
    """``TokenFilter`` keyword arguments (without ``ratio``) of a named configuration (an alias or a twin too)."""
    if not is_known(name):
        raise ValueError(f"Unknown configuration {name!r}; choose from {', '.join(PRESETS)} (or <name>-random).")
    name = canonical(name)
    if name in PRESETS:
        return dict(PRESETS[name])
    return random_twin(fields(name.removesuffix(RANDOM_SUFFIX)))


def sliding_window(recent: int, warmup: int = 4) -> dict:
    """``TokenFilter.sliding_window``'s fields: ``warmup`` attention sinks and the ``recent`` latest tokens."""
    return {**SLIDING_WINDOW, "recent": recent, "warmup": warmup}


def build(name: str, ratio: float, **overrides: object) -> TokenFilter | SlidingWindowShare:
    """The configuration ``name`` at ``ratio``: a ``TokenFilter``, or for ``sliding-window`` the window sized on
    every input to hold ``1 - ratio`` of its KV."""
    from tokenfilter.config import SlidingWindowShare, TokenFilter

    if name in SIZED_PER_INPUT:
        return SlidingWindowShare(held=1.0 - ratio, **overrides)
    return TokenFilter(ratio=ratio, **{**fields(name), **overrides})
