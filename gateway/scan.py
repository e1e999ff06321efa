"""``GET /kv?prefix=&limit=&cursor=``: one page of a prefix scan, as JSON.

Reply: ``{"items": [{"key", "value", "version"}, ...], "cursor": "..." | null}`` in key
order across every shard; pass ``cursor`` back to get the next page (null: done). The
cursor is opaque (the last key the page covered, base64url), so any key survives a URL.
``keys_only=true`` leaves the values out. An item whose value is not UTF-8 carries
``"value": null`` and ``"value_base64"`` (as ``GET /kv/{key}``); a key that is not UTF-8,
``"key": null`` and ``"key_base64"``. A page may be empty and still carry a cursor.
Errors map as for the other routes (422 bad parameters, 503 no leader, 504 timeout).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

from zkv.client.aio import AsyncKVClient
from zkv.client.batch import SCAN_PAGE_DEFAULT
from zkv.gateway import mapping
from zkv.gateway.kv import Reply, json_reply, problem_reply
from zkv.gateway.mapping import HTTPProblem
from zkv.protocol.limits import SCAN_LIMIT_MAX


def encode_cursor(cursor: bytes | None) -> str | None:
    return None if cursor is None else base64.urlsafe_b64encode(cursor).decode("ascii")


def decode_cursor(text: str | None) -> bytes | None:
    if text is None or text == "":
        return None
    try:
        return base64.b64decode(text.encode("ascii"), altchars=b"-_", validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise HTTPProblem(422, "cursor must be the value a previous page returned") from None


def parse_limit(text: str | None) -> int:
    if text is None or text == "":
        return SCAN_PAGE_DEFAULT
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if not 1 <= limit <= SCAN_LIMIT_MAX:
        raise HTTPProblem(422, f"limit must be an integer in 1..{SCAN_LIMIT_MAX}")
    return limit


def parse_bool(text: str | None) -> bool:
    return (text or "").lower() in ("1", "true", "yes")


def item_document(key: bytes, value: bytes | None, version: int) -> dict[str, Any]:
    try:
        name = key.decode("utf-8")
        doc: dict[str, Any] = {"key": name}
    except UnicodeDecodeError:
        doc = {"key": None, "key_base64": base64.b64encode(key).decode("ascii")}
    if value is not None:
        shown = mapping.value_document("", value, version)
        doc.update({k: v for k, v in shown.items() if k != "key"})
    else:
        doc["version"] = version
    return doc


async def scan_reply(client: Callable[[], AsyncKVClient], prefix: str, limit: str | None,
                     cursor: str | None, keys_only: str | None,
                     consistency: str | None) -> Reply:
    try:
        n = parse_limit(limit)
        after = decode_cursor(cursor)
        level = mapping.parse_consistency(consistency)
        only = parse_bool(keys_only)
        page = await client().scan(prefix, limit=n, cursor=after, keys_only=only,
                                   consistency=level)
    except HTTPProblem as p:
        return problem_reply(p)
    except Exception as exc:
        return problem_reply(mapping.status_for(exc, write=False))
    values: list[bytes | None] = list(page.values) if not only else [None] * len(page.keys)
    items = [item_document(k, v, ver) for k, v, ver in
             zip(page.keys, values, page.versions, strict=True)]
    return json_reply({"items": items, "cursor": encode_cursor(page.cursor)})
