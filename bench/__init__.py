"""Benchmark scripts: ``compare.py`` (zkv vs a bare relay, for ``make bench``) and
``relay_baseline.py`` (the bare pyzmq relay of the same shape as zkv)."""
