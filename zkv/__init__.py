"""zkv: a distributed, sharded, replicated in-memory key-value store on ZeroMQ.

What an application imports::

    from zkv import KVClient, AsyncKVClient, Consistency

    with KVClient("tcp://127.0.0.1:5555") as kv:
        version = kv.put("greeting", "hello")
        assert kv.get("greeting") == b"hello"

The installed package maps the repository's top-level folders under this one name:
``zkv.protocol`` (the wire), ``zkv.client`` (SDK and CLI), ``zkv.broker``,
``zkv.storage_node`` and ``zkv.ops`` (local cluster, rebalance coordinator, load
generator). Nothing else lands at the top of site-packages.
"""

from zkv.client import *  # noqa: F403 -- the SDK's public names are zkv's
from zkv.client import __all__ as __all__
