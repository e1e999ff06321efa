"""Process set-up shared by the long-running entry points (``zkv-broker``, ``zkv-node``):
logging sinks and garbage-collector settings. Components only ``logger.bind``; these
functions are called once, from ``main``.

GC:
The hot paths allocate many short-lived, acyclic objects (messages, frames, tuples).
CPython's default generation-0 threshold (700 allocations) then runs the cyclic
collector thousands of times a second for nothing; reference counting frees these
objects anyway. We freeze what startup built (never collected again) and collect young
objects 100x less often. Cycles are still collected, just later.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import signal
import sys
from typing import Any

from loguru import logger

GEN0_THRESHOLD = 70_000

LOG_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<cyan>{extra[component]}</cyan> {message}"
)


def configure_logging(level: str = "INFO", json: bool = False) -> None:
    """One stderr sink: text, or one JSON object per line with ``json``."""
    logger.remove()
    logger.configure(extra={"component": "-"})
    if json:
        logger.add(sys.stderr, level=level.upper(), serialize=True, backtrace=False)
    else:
        logger.add(sys.stderr, level=level.upper(), format=LOG_FORMAT, backtrace=False)


def tune_gc() -> None:
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)


def _load_prctl() -> Any:
    """libc's ``prctl``, looked up once, in the parent: a forked child must not
    ``dlopen`` (another thread may have held the loader's lock at the fork)."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def die_with_parent() -> None:  # pragma: no cover - runs in the child
    """In a child (forked, or about to exec): the kernel SIGKILLs it when the thread
    that made it dies (``PR_SET_PDEATHSIG``; Linux only, a no-op elsewhere)."""
    if _PRCTL is not None:
        with contextlib.suppress(Exception):
            _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
