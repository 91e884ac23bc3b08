"""Token Filtering: online, calibration-free token pruning for Hugging Face decoder LLMs.

    from tokenfilter import TokenFilter
    with TokenFilter(ratio=0.5).apply(model) as run:
        model.generate(**inputs)
    print(run.stats)
"""

from tokenfilter.config import TokenFilter
from tokenfilter.integration.families import SUPPORTED, UnsupportedModelError
from tokenfilter.integration.run import FilterRun
from tokenfilter.stats import FilterStats, layer_flop_fraction

__version__ = "0.1.0"
__all__ = ["SUPPORTED", "FilterRun", "FilterStats", "TokenFilter", "UnsupportedModelError", "layer_flop_fraction"]
