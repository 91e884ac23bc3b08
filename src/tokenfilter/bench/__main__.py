"""``python -m tokenfilter.bench``: the benchmark on its own (same options as ``tokenfilter bench``)."""

from tokenfilter.bench.cli import main

raise SystemExit(main())
