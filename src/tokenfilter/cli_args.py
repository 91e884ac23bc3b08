"""Argument types and constants of the command line, in a module that imports nothing heavy, so that
``tokenfilter --help`` builds its parsers without torch, transformers or lm-eval."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

STAGES = ("layers", "select", "heldout", "accuracy", "second")  # the stages of ``tokenfilter study``


def ratios(text: str) -> list[float]:
    """argparse type: comma-separated ratios in [0, 1)."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    for v in values:
        if not 0 <= v < 1:
            raise argparse.ArgumentTypeError(f"every ratio must be in [0, 1), got {v}")
    return values


def names(text: str) -> list[str]:
    """argparse type: comma-separated names."""
    return [x.strip() for x in text.split(",") if x.strip()]


def positive_ints(text: str) -> list[int]:
    """argparse type: comma-separated positive integers."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type factory: one integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {v}")
        return v

    return parse


positive_int = int_at_least(1)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which a container or ``taskset`` narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1
