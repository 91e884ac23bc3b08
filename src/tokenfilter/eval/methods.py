"""The methods the evaluation compares, by name; their configurations are in :mod:`tokenfilter.presets` (one name
each). Token Filtering variants are ``TokenFilter`` changes from the library default (KV side with a recent window of
64, uniform schedule from layer 2, the two-horizon key score, chosen by the studies): ``random`` is its random twin;
``spec-score`` is the same with the SPEC's score (EMA similarity of K and V, variance fusion), and the
``spec-fusion-*`` rows change that score's fusion; ``kv-w64`` pins its window at 64 (the previous default, the
KV-side study's ``kv-w64``; ``kv-window`` is its older name); ``paper`` is the SPEC's own reading
(``TokenFilter.paper``: the query side, tail-linear from ``L // 2``, no window); ``query-side`` is the query-side
skip with our schedule (the default before the KV-side study); ``kv-side`` drops the window; ``shortgpt*`` are
layer-removal baselines matched to Token Filtering's FLOPs. ``sliding-window`` is StreamingLLM's rule
(``TokenFilter.sliding_window``: 4 sinks and a recent band, no score) sized on every input to hold ``1 - ratio`` of
its KV, so it stands at the ratio's nominal budget on prompts of any length.

This module imports nothing heavy (``tokenfilter --help`` lists the methods)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenfilter import presets
from tokenfilter.presets import SIZED_PER_INPUT

if TYPE_CHECKING:
    from tokenfilter.config import SlidingWindowShare, TokenFilter

# eval's selection of presets (canonical names), in the order of its tables
FILTER_METHODS = ("token-filter", "random", "paper", "query-side", "query-side-random", "spec-score",
                  "spec-fusion-mean", "spec-fusion-key", "spec-fusion-value", "query-side-kv-keep",
                  "post-rope-keys", "kv-side", "kv-w64", "kv-w64-random")
# older names of the same configurations, still accepted (a row is labelled with the name it was given)
FILTER_ALIASES = tuple(a for a in (*presets.ALIASES, *(f"{a}{presets.RANDOM_SUFFIX}" for a in presets.ALIASES))
                       if presets.canonical(a) in FILTER_METHODS and a not in FILTER_METHODS)
# name -> TokenFilter fields (without ratio): a view of tokenfilter.presets
FILTER_VARIANTS: dict[str, dict] = {name: presets.fields(name) for name in (*FILTER_METHODS, *FILTER_ALIASES)}
LAYER_REMOVAL = ("shortgpt", "shortgpt-calib2")
ALL_METHODS = ("dense", *FILTER_METHODS, *SIZED_PER_INPUT, *LAYER_REMOVAL)
DEFAULT_METHODS = ("dense", "token-filter")


def filter_for(method: str, ratio: float) -> TokenFilter | SlidingWindowShare:
    from tokenfilter.config import SlidingWindowShare, TokenFilter

    if method in SIZED_PER_INPUT:
        return SlidingWindowShare(held=1.0 - ratio)
    return TokenFilter(ratio=ratio, **FILTER_VARIANTS[method])


def resolve_methods(names: list[str]) -> list[str]:
    """The methods to run, in order, once each (an older name and its canonical one are the same method: the
    first given is kept)."""
    out: dict[str, str] = {}  # canonical -> the name given
    for name in names:
        for method in ALL_METHODS if name == "all" else [name]:
            if method not in ALL_METHODS and method not in FILTER_VARIANTS:
                raise ValueError(f"Unknown method {method!r}; choose from {', '.join(ALL_METHODS)} or all "
                                 f"(older names: {', '.join(FILTER_ALIASES)}).")
            out.setdefault(presets.canonical(method) if method in FILTER_VARIANTS else method, method)
    return list(out.values())
