"""Long-context evaluation: needle in a haystack and MiniLongBench (LongBench v1, English tasks).

Modules: ``needle`` (prompt builder), ``longbench`` (loading, middle truncation, prompts), ``metrics``
(LongBench's scorers), ``plots`` (heat maps), ``runner`` (``run_longctx``: every benchmark per method).
"""

from tokenfilter.longctx.runner import run_longctx, summary_table

__all__ = ["run_longctx", "summary_table"]
