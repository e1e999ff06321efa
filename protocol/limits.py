"""Every bound the wire and the data model share, in one place.

The broker, the SDK and the storage node all check a request against these (the broker
and the SDK early, to spare the network; the node last, because it is the one that must
hold); the codec and the ring's wire format check what they decode against them. A
bound exists so that no input, hostile or mistaken, can make a process allocate or
compute without limit (invariant 10). The data-size limits are defaults an operator may
raise (``--key-bytes-max``, ``--value-bytes-max``); the structural ones are fixed.
"""

from __future__ import annotations

#: Defaults for a key and a value (configurable on broker, node and SDK).
KEY_BYTES_MAX = 16 * 1024
VALUE_BYTES_MAX = 1024 * 1024

#: Every integer on the wire (ids, terms, indexes, versions, epochs) is non-negative
#: and below 2**63, so arithmetic on it (term + 1) still fits the wire and the disk.
INT_MAX = (1 << 63) - 1

#: A ring's size (shards x vnodes): building it hashes that many tokens, so a peer
#: cannot make a broker or node spend unbounded time on a ring it sent.
RING_TOKENS_MAX = 1 << 18
RING_VNODES_MIN = 1

#: Frames: a value above this travels in its own frame rather than inside the header.
INLINE_BLOB_BYTES_MAX = 8 * 1024
#: What one msgpack header may contain while decoding (values travel in the BLOB frame).
HEADER_BYTES_MAX = 64 * 1024 * 1024
HEADER_STR_BYTES_MAX = 1024 * 1024
HEADER_ARRAY_LEN_MAX = 1_000_000
HEADER_MAP_LEN_MAX = 100_000
#: A heartbeat is small; the broker's SUB socket refuses anything larger.
HEARTBEAT_BYTES_MAX = 1024 * 1024
#: A node id is a zmq routing identity (at most 255 bytes).
NODE_ID_BYTES_MAX = 255

#: Admin: nodes named as a stream's targets, keys and bytes per migration batch.
ADMIN_TARGETS_MAX = 64
MIGRATE_BATCH_KEYS_MAX = 10_000
MIGRATE_BATCH_BYTES_MAX = 8 * 1024 * 1024

#: Batches and scans (``protocol/multikey.py``). A batch holds at most this many keys
#: (the SDK refuses more with ``TooLarge``; the broker and the node answer TOO_LARGE):
#: it bounds the work one request makes a broker split and a shard apply in one entry.
MULTI_KEYS_MAX = 1000
#: Keys + values of one batch request: one log entry per shard, so well under the
#: command bound (64 MiB) and the header bound.
MULTI_REQUEST_BYTES_MAX = 16 * 1024 * 1024
#: Values one batch reply carries (per shard, and merged by the broker): keys past it
#: are answered ``UNAVAILABLE`` and the SDK asks for them again in the next round.
MULTI_REPLY_BYTES_MAX = 16 * 1024 * 1024
#: Keys per scan page (the SDK's default page is 100) ...
SCAN_LIMIT_MAX = 1000
#: ... bytes of keys + values per shard page (the page stops early, the cursor says where) ...
SCAN_REPLY_BYTES_MAX = 4 * 1024 * 1024
#: ... and keys a shard examines for one page, owned or not (a new shard holding copies it
#: does not own yet, or a sparse prefix, cannot make one page walk the whole shard).
SCAN_EXAMINED_MAX = 10_000
