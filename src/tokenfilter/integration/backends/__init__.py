"""Attention backends behind one protocol (``base.AttentionBackend``), chosen by ``TokenFilter(path=...)``.

To add one (a GPU kernel, FlexAttention, flash varlen): one file with a class that implements the protocol, and
one line in ``BACKENDS``. The equivalence tests run every registered backend against ``reference``.
"""

from __future__ import annotations

import warnings

from tokenfilter.algorithm.visibility import Visibility
from tokenfilter.integration.backends.base import AttentionBackend, Projections, QuerySelection, Reading
from tokenfilter.integration.backends.budget import BudgetBackend
from tokenfilter.integration.backends.fast import FastBackend
from tokenfilter.integration.backends.reference import ReferenceBackend
from tokenfilter.integration.units import Units

BACKENDS: dict[str, AttentionBackend] = {"fast": FastBackend(), "reference": ReferenceBackend()}
FALLBACK = "reference"  # runs every layer: the definition
# a layer under a KV budget (``Visibility.slots``) runs this one in place of the named backend (the reference stays)
BUDGET: dict[str, AttentionBackend] = {"fast": BudgetBackend()}
_WARNED: set[str] = set()


def backend_for(name: str, units: Units, vis: Visibility) -> AttentionBackend:
    """The backend ``name`` if it runs this layer, else the reference one, with a warning (once per reason)."""
    backend = BUDGET.get(name, BACKENDS[name]) if vis.slots is not None else BACKENDS[name]
    reason = backend.supports(units, vis)
    if reason is None:
        return backend
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"tokenfilter: {reason}; using the {FALLBACK} backend for it.", stacklevel=3)
    return BACKENDS[FALLBACK]


__all__ = ["BACKENDS", "AttentionBackend", "Projections", "QuerySelection", "Reading", "backend_for"]
