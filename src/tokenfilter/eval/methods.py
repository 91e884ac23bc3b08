"""The methods the evaluation compares, by name. Token Filtering variants are ``TokenFilter`` changes from the
library default (KV side with a recent window of 64, uniform schedule from layer 2, the two-horizon key score, chosen
by the studies): ``random`` is its random twin; ``spec-score`` is the same with the SPEC's score (EMA similarity of K
and V, variance fusion), and the ``fusion-*`` rows change that score's fusion; ``kv-window`` is the same as
``spec-score`` (the previous default, the study's ``kv-w64``); ``paper`` is the SPEC's own reading
(``TokenFilter.paper``: the query side, tail-linear from ``L // 2``, no window); ``query-side`` is the query-side
skip with our schedule (the default before the KV-side study); ``kv-side`` drops the window; ``shortgpt*`` are
layer-removal baselines matched to Token Filtering's FLOPs. ``sliding-window`` is StreamingLLM's rule
(``TokenFilter.sliding_window``: 4 sinks and a recent band, no score) sized on every input to hold ``1 - ratio`` of
its KV, so it stands at the ratio's nominal budget on prompts of any length."""

from __future__ import annotations

from tokenfilter.config import PAPER_READING, QUERY_SIDE, SPEC_SCORE, SlidingWindowShare, TokenFilter

FILTER_VARIANTS: dict[str, dict] = {
    "token-filter": {},
    "random": {"score": "random"},
    "paper": PAPER_READING,
    "query-side": QUERY_SIDE,
    "query-side-random": {**QUERY_SIDE, "score": "random"},
    "spec-score": SPEC_SCORE,
    "fusion-mean": {**SPEC_SCORE, "fusion": "mean"},
    "fusion-key": {**SPEC_SCORE, "fusion": "key"},
    "fusion-value": {**SPEC_SCORE, "fusion": "value"},
    "kv-keep": {**QUERY_SIDE, "kv": "keep"},
    "post-rope": {"pre_rope": False},
    "kv-side": {"skip": "none", "recent": None},
    "kv-window": {"skip": "none", "recent": 64, **SPEC_SCORE},
    "kv-window-random": {"skip": "none", "recent": 64, **SPEC_SCORE, "score": "random"},
}
SIZED_PER_INPUT = ("sliding-window",)
LAYER_REMOVAL = ("shortgpt", "shortgpt-calib2")
ALL_METHODS = ("dense", *FILTER_VARIANTS, *SIZED_PER_INPUT, *LAYER_REMOVAL)
DEFAULT_METHODS = ("dense", "token-filter")


def filter_for(method: str, ratio: float) -> TokenFilter | SlidingWindowShare:
    if method == "sliding-window":
        return SlidingWindowShare(held=1.0 - ratio)
    return TokenFilter(ratio=ratio, **FILTER_VARIANTS[method])


def resolve_methods(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        if name == "all":
            out.extend(ALL_METHODS)
        elif name in ALL_METHODS:
            out.append(name)
        else:
            raise ValueError(f"Unknown method {name!r}; choose from {', '.join(ALL_METHODS)} or all.")
    return list(dict.fromkeys(out))
