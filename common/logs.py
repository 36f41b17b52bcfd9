"""How spindle's processes log: one line format, the chosen level for spindle's own loggers
(`spindle.*`), and no more detail than INFO from the libraries' (sse-starlette logs every SSE
chunk at DEBUG, which made `--log-level debug` a per-token cost on the gateway)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def library_level(level: str) -> str:
    """The level the libraries log at for spindle's `level`: the same, but never below INFO."""
    return "INFO" if logging.getLevelName(level.upper()) < logging.INFO else level.upper()


def configure_logging(level: str, handlers: Sequence[logging.Handler] | None = None) -> None:
    """The root logger at `library_level(level)`, the `spindle` loggers at `level`."""
    logging.basicConfig(format=LINE_FORMAT, handlers=list(handlers) if handlers else None)
    logging.getLogger().setLevel(library_level(level))  # also where a handler was already set
    logging.getLogger("spindle").setLevel(level.upper())
