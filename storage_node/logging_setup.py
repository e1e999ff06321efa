"""loguru sinks for the ``zkv-node`` entry point (components only ``bind``)."""

from __future__ import annotations

import sys

from loguru import logger

FORMAT = (
    "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<cyan>{extra[component]}</cyan> {message}"
)


def configure_logging(level: str = "INFO", json: bool = False) -> None:
    logger.remove()
    logger.configure(extra={"component": "-"})
    logger.add(sys.stderr, level=level.upper(), format=FORMAT, serialize=json, backtrace=False)
