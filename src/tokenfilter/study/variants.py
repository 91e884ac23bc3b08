"""The candidate configurations of the query-side study: changes from the SPEC (paper) reading, by name.

This study is about the query side (``skip="attention"``, the paper's reading, the library default until the
KV-side study replaced it): every candidate pins it, so its numbers do not move with the library default.

Every candidate is scored at the same target ratios; ``random@<name>`` is the same candidate with a random
choice of tokens (the floor that isolates the similarity score from the schedule).
"""

from __future__ import annotations

from tokenfilter.config import PAPER_READING, QUERY_SIDE, TokenFilter

PAPER = "paper"

# from the SPEC's choices (PAPER_READING: the query side, tail-linear from L // 2, kv drop; and the field defaults:
# variance fusion, lam 1, gamma 0.9, warm-up 4, pre-RoPE keys)
CANDIDATES: dict[str, dict] = {
    PAPER: PAPER_READING,
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
    "uniform-from-2": {**QUERY_SIDE, "schedule": "uniform", "start_layer": 2},
    "tail-from-2-kv-keep": {**QUERY_SIDE, "schedule": "tail-linear", "start_layer": 2, "kv": "keep"},
    "uniform-from-2-kv-keep": {**QUERY_SIDE, "schedule": "uniform", "start_layer": 2, "kv": "keep"},
}
# the random floor for every distinct schedule / cache policy among the candidates
RANDOM_OF = (PAPER, "kv-keep", "tail-from-2", "uniform-from-2", "tail-from-2-kv-keep", "uniform-from-2-kv-keep")


def random_name(name: str) -> str:
    return f"random@{name}"


def all_names() -> list[str]:
    return [*CANDIDATES, *(random_name(n) for n in RANDOM_OF)]


def kwargs_of(name: str, seed: int = 0) -> dict:
    """``TokenFilter`` keyword arguments (without ``ratio``) of a candidate or of its random twin."""
    if name.startswith("random@"):
        base = name.removeprefix("random@")
        if base not in CANDIDATES:
            raise ValueError(f"Unknown study candidate {base!r}; choose from {', '.join(CANDIDATES)}.")
        return {**CANDIDATES[base], "score": "random", "seed": seed}
    if name not in CANDIDATES:
        raise ValueError(f"Unknown study candidate {name!r}; choose from {', '.join(all_names())}.")
    return dict(CANDIDATES[name])


def filter_of(name: str, ratio: float, seed: int = 0) -> TokenFilter:
    return TokenFilter(ratio=ratio, **kwargs_of(name, seed))


def single_layer(num_layers: int, layer: int, ratio: float, random: bool = False, seed: int = 0) -> TokenFilter:
    """Filter ``ratio`` of the tokens at one layer only (the per-layer sensitivity probe)."""
    schedule = [0.0] * num_layers
    schedule[layer] = ratio
    extra = {"score": "random", "seed": seed} if random else {}
    return TokenFilter(schedule=schedule, **{**QUERY_SIDE, **extra})
