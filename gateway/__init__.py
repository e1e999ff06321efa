"""zkv's HTTP gateway (``zkv gateway``, extra ``zkv[http]``): the REST API over the
asyncio SDK (``app``), header/body/error translation (``mapping``), the gateway's own
Prometheus metrics (``metrics``) and the live cluster page (``ui``).

Only ``main`` imports nothing from the http extra at module level, so ``zkv --help``
works without it.
"""
