"""The candidate configurations of the query-side study: changes from the SPEC (paper) reading, by name.

This study is about the query side (``skip="attention"``, the paper's reading, the library default until the
KV-side study replaced it): every candidate pins it, so its numbers do not move with the library default.

Every candidate is scored at the same target ratios; ``random@<name>`` is the same candidate with a random
choice of tokens (the floor that isolates the similarity score from the schedule).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenfilter import presets
from tokenfilter.presets import QUERY_SIDE

if TYPE_CHECKING:
    from tokenfilter.config import TokenFilter

PAPER = "paper"

# the candidates, by the names the study records (docs/study.md); their fields are in tokenfilter.presets
# ("uniform-from-2" and "uniform-from-2-kv-keep" are older names of its query-side rows)
NAMES = ("paper", "kv-keep", "skip-block", "fusion-mean", "fusion-key", "fusion-value", "lam-0", "lam-3", "gamma-0.5",
         "gamma-0.98", "warmup-32", "post-rope", "tail-from-2", "uniform-from-2", "tail-from-2-kv-keep",
         "uniform-from-2-kv-keep")
CANDIDATES: dict[str, dict] = {name: presets.fields(name) for name in NAMES}
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
        return presets.random_twin(CANDIDATES[base], seed)
    if name not in CANDIDATES:
        raise ValueError(f"Unknown study candidate {name!r}; choose from {', '.join(all_names())}.")
    return dict(CANDIDATES[name])


def filter_of(name: str, ratio: float, seed: int = 0) -> TokenFilter:
    from tokenfilter.config import TokenFilter

    return TokenFilter(ratio=ratio, **kwargs_of(name, seed))


def single_layer(num_layers: int, layer: int, ratio: float, random: bool = False, seed: int = 0) -> TokenFilter:
    """Filter ``ratio`` of the tokens at one layer only (the per-layer sensitivity probe)."""
    from tokenfilter.config import TokenFilter

    schedule = [0.0] * num_layers
    schedule[layer] = ratio
    extra = {"score": "random", "seed": seed} if random else {}
    return TokenFilter(schedule=schedule, **{**QUERY_SIDE, **extra})
