"""Performance benchmark: prefill latency, decode throughput and KV-cache bytes, dense vs Token Filtering.

    from tokenfilter.bench import BenchConfig, run_bench
    result = run_bench(model, tokenizer, BenchConfig(lengths=[512, 1024]))

The command line is ``tokenfilter bench`` (or ``python -m tokenfilter.bench``); see ``tokenfilter.bench.cli``.
"""

from tokenfilter.bench.runner import BenchConfig, run_bench

__all__ = ["BenchConfig", "run_bench"]
