"""Performance benchmark: prefill latency, decode throughput and KV-cache bytes, dense vs Token Filtering.

    from tokenfilter.bench import BenchConfig, run_bench
    result = run_bench(model, tokenizer, BenchConfig(lengths=[512, 1024]))

The command line is ``tokenfilter bench`` (or ``python -m tokenfilter.bench``); see ``tokenfilter.bench.cli``.
The names here load on first use, so that ``tokenfilter bench --help`` does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenfilter.bench.grid import BenchConfig
    from tokenfilter.bench.runner import run_bench

__all__ = ["BenchConfig", "run_bench"]


def __getattr__(name: str):
    if name in __all__:
        from tokenfilter.bench import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'tokenfilter.bench' has no attribute {name!r}")
