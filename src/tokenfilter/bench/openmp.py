"""OpenMP threads that sleep as soon as they are idle, so that a timing with several threads does not depend on how
busy the other cores are.

PyTorch's CPU operators run on GNU OpenMP's thread team. By default an idle team thread spins for a while before it
sleeps, waiting for the next parallel operator. On a machine where another process keeps a core busy, the thread on
that core spins away the share of the core the scheduler gives it, and the next parallel operator then waits for it to
be scheduled again. An operator that is long (a prefill's matmul) hardly notices; a forward of many short parallel
operators, which a filtered layer is (the score, the decision, the attention in blocks), waits again and again. With
``OMP_WAIT_POLICY=PASSIVE`` an idle thread sleeps at once and is woken for the next operator.

The policy is read once, when the OpenMP runtime loads with torch, so ``apply_setting`` sets it before torch is
imported, for dense and every method alike; it leaves a policy the environment already names, and says so. With one
thread there is no team and the setting changes nothing.
"""

from __future__ import annotations

import os
import sys

VARIABLE = "OMP_WAIT_POLICY"
PASSIVE = "idle OpenMP threads sleep at once (OMP_WAIT_POLICY=PASSIVE), for every method alike"
SYSTEM = "OpenMP's wait policy as configured (GNU OpenMP's default: idle threads spin a while, then sleep)"


def apply_setting(setting: str) -> str:
    """``--omp-wait``: ``passive`` (set ``OMP_WAIT_POLICY=PASSIVE`` before torch loads) or ``system``; returns what
    OpenMP's idle threads do, for the report."""
    if setting not in ("passive", "system"):
        raise ValueError(f"--omp-wait is passive or system, got {setting!r}.")
    named = os.environ.get(VARIABLE)
    if named:
        return f"OpenMP's wait policy as the environment names it ({VARIABLE}={named})"
    if setting == "system":
        return SYSTEM
    if "torch" in sys.modules:
        return f"{SYSTEM}: torch was loaded before the setting, and OpenMP reads it only when it loads"
    os.environ[VARIABLE] = "PASSIVE"
    return PASSIVE
