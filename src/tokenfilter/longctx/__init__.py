"""Long-context evaluation: needle in a haystack, MiniLongBench (LongBench v1, English tasks) and RULER's synthetic
tasks.

Modules: ``needle`` (prompt builder), ``longbench`` (loading, middle truncation, prompts), ``metrics``
(LongBench's scorers), ``plots`` (heat maps), ``runner`` (``run_longctx``: every benchmark per method), ``ruler``
(RULER's tasks generated offline, string-match scoring) and ``ruler_runner`` (``run_ruler``: every method on them).
"""

from tokenfilter.longctx.runner import run_longctx, summary_table

__all__ = ["run_longctx", "summary_table"]
