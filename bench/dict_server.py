"""The baseline of ``make bench-http``: the shape of the service zkv grew out of, a
minimal FastAPI app over a Python dict (one process, no replication, no disk), run
under the same uvicorn (uvloop + httptools) as the gateway.

    python -m uvicorn bench.dict_server:app --port 8001 --workers 1
"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

app = FastAPI(title="dict kv")
store: dict[str, tuple[str, int]] = {}
version = 0


class Item(BaseModel):
    key: str
    value: str


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.put("/kv/{key:path}")
async def put(key: str, item: Item) -> dict[str, object]:
    global version
    if item.key != key:
        raise HTTPException(422, "key mismatch")
    version += 1
    store[key] = (item.value, version)
    return {"key": key, "version": version}


@app.get("/kv/{key:path}")
async def get(key: str) -> dict[str, object]:
    found = store.get(key)
    if found is None:
        raise HTTPException(404, "key not found")
    return {"key": key, "value": found[0], "version": found[1]}


@app.delete("/kv/{key:path}")
async def delete(key: str) -> dict[str, object]:
    if store.pop(key, None) is None:
        raise HTTPException(404, "key not found")
    return {"key": key, "deleted": True}
