"""Argument types and constants of the command line, in a module that imports nothing heavy, so that
``tokenfilter --help`` builds its parsers without torch, transformers or lm-eval."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from tokenfilter.builtin_models import BUILTIN, DEFAULT

STAGES = ("layers", "select", "heldout", "accuracy", "second")  # the stages of ``tokenfilter study``
MODEL_HELP = f"a built-in name ({', '.join(BUILTIN)}), local folder, .gguf file or hub id (default: {DEFAULT})"


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
    """argparse type: comma-separated names, at least one."""
    values = [x.strip() for x in text.split(",") if x.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected one name or more, comma-separated, got {text!r}")
    return values


def positive_ints(text: str) -> list[int]:
    """argparse type: comma-separated positive integers."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def int_at_least(minimum: int, note: str = "") -> Callable[[str], int]:
    """argparse type factory: one integer >= ``minimum`` (``note``, e.g. "0 = all", goes into the error)."""
    return int_between(minimum, None, note)


def int_between(minimum: int, maximum: int | None, note: str = "") -> Callable[[str], int]:
    """argparse type factory: one integer in ``[minimum, maximum]`` (no upper bound when ``maximum`` is None).
    argparse prints its error as one line that names the option, at parse time, before any model loads."""
    bounds = f"{minimum} or more" if maximum is None else f"from {minimum} to {maximum}"
    wanted = f"expected a whole number {bounds}" + (f" ({note})" if note else "")

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{wanted}, got {text!r}") from None
        if v < minimum or (maximum is not None and v > maximum):
            raise argparse.ArgumentTypeError(f"{wanted}, got {v}")
        return v

    return parse


def percents(text: str) -> list[float]:
    """argparse type: comma-separated numbers in [0, 100] (e.g. needle depths)."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 <= v <= 100 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers from 0 to 100, got {text!r}")
    return values


positive_int = int_at_least(1)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which a container or ``taskset`` narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1
