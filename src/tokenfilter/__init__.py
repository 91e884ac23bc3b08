"""Token Filtering: online, calibration-free token pruning for Hugging Face decoder LLMs.

    from tokenfilter import TokenFilter
    with TokenFilter(ratio=0.5).apply(model) as run:
        model.generate(**inputs)
    print(run.stats)

The names below are imported on first use, so ``import tokenfilter.cli`` (and ``tokenfilter --help``) does
not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "TokenFilter": "tokenfilter.config",
    "SUPPORTED": "tokenfilter.integration.families",
    "UnsupportedModelError": "tokenfilter.integration.families",
    "FilterRun": "tokenfilter.integration.run",
    "FilterStats": "tokenfilter.stats",
    "layer_flop_fraction": "tokenfilter.stats",
}
__all__ = ["SUPPORTED", "FilterRun", "FilterStats", "TokenFilter", "UnsupportedModelError", "layer_flop_fraction"]

if TYPE_CHECKING:
    from tokenfilter.config import TokenFilter
    from tokenfilter.integration.families import SUPPORTED, UnsupportedModelError
    from tokenfilter.integration.run import FilterRun
    from tokenfilter.stats import FilterStats, layer_flop_fraction


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tokenfilter' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
