"""Benchmark scripts: ``compare.py`` (zkv vs a bare relay, for ``make bench``),
``relay_baseline.py`` (the bare pyzmq relay of the same shape as zkv), ``failover.py``
(``make bench-failover``), ``migration.py`` (adding a shard under traffic) and
``ring.py`` (the ring's build and lookup cost)."""
