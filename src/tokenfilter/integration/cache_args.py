"""Where a forward's cache argument is, across the transformers versions we support."""

from __future__ import annotations

import transformers
from transformers.cache_utils import Cache

# transformers renamed the cache argument of decoders and attention modules from ``past_key_values`` to ``cache``
# (5.24; the old name is accepted until 5.40): read whichever the caller used.
CACHE_KWARGS = ("cache", "past_key_values")


def cache_argument(arguments: dict) -> object | None:
    """The cache among a forward's arguments (by either name), or None; raise if one is there by a third name."""
    for name in CACHE_KWARGS:
        if arguments.get(name) is not None:
            return arguments[name]
    for name, value in arguments.items():
        if isinstance(value, Cache):
            raise RuntimeError(
                f"This transformers version ({transformers.__version__}) passes the cache as {name!r}, which Token "
                f"Filtering does not know; install a transformers version that tokenfilter supports "
                f"(see pyproject.toml)."
            )
    kwargs = arguments.get("kwargs")
    return cache_argument(kwargs) if isinstance(kwargs, dict) else None
