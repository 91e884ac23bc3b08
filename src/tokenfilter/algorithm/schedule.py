"""Per-layer target ratios: which layers filter, and how much.

The overall ``ratio`` is the mean of the per-layer ratios over *all* L layers (SPEC, "Pruning ratio").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

SCHEDULE_ERROR = "schedule must be 'uniform', 'tail-linear', 'front-linear' or a per-layer list, got {schedule!r}."


@dataclass(frozen=True)
class Schedule:
    """Resolved schedule: ``ratios[l]`` is layer l's target ratio; ``start`` the first filtered layer."""

    ratios: tuple[float, ...]
    start: int

    @property
    def filtered_layers(self) -> tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.ratios) if r > 0)


def tail_linear(ratio: float, num_layers: int, start: int, cap: float) -> Schedule:
    """Water-filled linear ramp ``r_l = min(cap, c * (l - start + 1))`` with ``mean(r) == ratio``.

    If even every tail layer at ``cap`` cannot reach ``ratio``, the start moves one layer earlier at a time.
    """
    return _ramp(ratio, num_layers, start, cap, rising=True)


def front_linear(ratio: float, num_layers: int, start: int, cap: float) -> Schedule:
    """The mirror of ``tail_linear``: ``r_l = min(cap, c * (L - l))`` from ``start`` on, highest at the first
    filtered layer and lowest at the last, so the late layers keep the most of their KV. Same water-filling and
    start rule."""
    return _ramp(ratio, num_layers, start, cap, rising=False)


def _ramp(ratio: float, num_layers: int, start: int, cap: float, rising: bool) -> Schedule:
    _check_target(ratio, cap)
    if ratio == 0:
        return Schedule((0.0,) * num_layers, start)
    target = ratio * num_layers
    while start > 0 and (num_layers - start) * cap < target - 1e-12:
        start -= 1
    weights = [0 if i < start else (i - start + 1 if rising else num_layers - i) for i in range(num_layers)]

    def total(c: float) -> float:
        return sum(min(cap, c * w) for w in weights)

    lo, hi = 0.0, cap  # every weight is >= 1, so c = cap saturates the whole tail
    for _ in range(200):
        mid = (lo + hi) / 2
        if total(mid) < target:
            lo = mid
        else:
            hi = mid
    c = (lo + hi) / 2
    return Schedule(tuple(min(cap, c * w) for w in weights), start)


def uniform(ratio: float, num_layers: int, start: int, cap: float) -> Schedule:
    """The same ratio on every layer from ``start`` on (start moves earlier if the cap demands it)."""
    _check_target(ratio, cap)
    target = ratio * num_layers
    while start > 0 and (num_layers - start) * cap < target - 1e-12:
        start -= 1
    per_layer = target / (num_layers - start) if ratio > 0 else 0.0
    return Schedule(tuple(per_layer if i >= start else 0.0 for i in range(num_layers)), start)


def explicit(ratios: Sequence[float], num_layers: int, cap: float) -> Schedule:
    if len(ratios) != num_layers:
        raise ValueError(
            f"The explicit schedule has {len(ratios)} entries but the model has {num_layers} layers; "
            "give one ratio per layer."
        )
    for r in ratios:
        if not 0 <= r <= cap:
            raise ValueError(f"Every per-layer ratio must lie in [0, max_layer_ratio={cap}], got {r}.")
    nonzero = [i for i, r in enumerate(ratios) if r > 0]
    return Schedule(tuple(float(r) for r in ratios), nonzero[0] if nonzero else num_layers)


# the named schedules (a per-layer list is the other kind): name -> (ratio, num_layers, start, cap) -> Schedule
NAMED = {"uniform": uniform, "tail-linear": tail_linear, "front-linear": front_linear}
SCHEDULES = tuple(NAMED)


def first_layer(start_layer: int | None, num_layers: int) -> int:
    """The first filtered layer: ``start_layer``, or the SPEC's ``L // 2`` when it is None (checked in range)."""
    start = num_layers // 2 if start_layer is None else start_layer
    if not 0 <= start < num_layers:
        raise ValueError(f"start_layer must be in [0, {num_layers - 1}] for this model, got {start_layer}.")
    return start


def resolve(
    schedule: str | Sequence[float], ratio: float, num_layers: int, start_layer: int | None, cap: float
) -> Schedule:
    """Turn a schedule name (or an explicit list) into per-layer ratios for a model with ``num_layers``."""
    start = first_layer(start_layer, num_layers)
    if isinstance(schedule, str):
        if schedule not in NAMED:
            raise ValueError(SCHEDULE_ERROR.format(schedule=schedule))
        return NAMED[schedule](ratio, num_layers, start, cap)
    return explicit(schedule, num_layers, cap)


def _check_target(ratio: float, cap: float) -> None:
    if ratio > cap:
        raise ValueError(
            f"ratio={ratio} is above max_layer_ratio={cap}: no schedule can reach it; "
            "lower the ratio or raise max_layer_ratio."
        )
