"""structlog set-up shared by every process: one event name per line, key=value fields.

Readable on a terminal, JSON lines with ``--log-json``. Every line carries the process's actor
name; ``session``/``turn`` are bound by the code that knows them (``log.bind(session=...)``).
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure(actor: str, *, json: bool = False, level: str = "info") -> structlog.stdlib.BoundLogger:
    """Configure structlog for this process and return a logger bound to ``actor``."""
    numeric = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=numeric, stream=sys.stderr, format="%(message)s")
    renderer: structlog.typing.Processor
    if json:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(), pad_event_to=24)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S.%f" if not json else "iso"),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(actor=actor)
    return structlog.get_logger()


def get(**fields: object) -> structlog.stdlib.BoundLogger:
    """A logger with ``fields`` bound (e.g. ``session=...``)."""
    return structlog.get_logger().bind(**fields)
