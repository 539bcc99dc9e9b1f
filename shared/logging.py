"""structlog set-up: one event per line with key-value context; JSON unless on a terminal."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(service: str, *, fmt: str = "auto", level: str = "INFO") -> None:
    renderer: structlog.typing.Processor
    if fmt == "json" or (fmt == "auto" and not sys.stderr.isatty()):
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer()
    numeric_level = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
    # libraries that log through the standard library (uvicorn, aio-pika) go to stderr too
    logging.basicConfig(level=max(numeric_level, logging.WARNING), stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_bounded)
    # these warn about what users send, quoting it (a prompt cut at CLIP's 77 tokens): user
    # content is never logged, so only their errors are
    # (they set their level when first imported, from these variables; later, through this)
    for library in QUOTING_LIBRARIES:
        os.environ.setdefault(f"{library.upper()}_VERBOSITY", "error")
        logging.getLogger(library).setLevel(max(numeric_level, logging.ERROR))


QUOTING_LIBRARIES = ("transformers", "diffusers")
MAX_LIBRARY_LINE = 2000  # characters of one library's log line


def _bounded(record: logging.LogRecord) -> bool:
    """A library's line cut to MAX_LIBRARY_LINE characters: whatever it quotes, a line stays a line."""
    message = record.getMessage()
    if len(message) > MAX_LIBRARY_LINE:
        record.msg, record.args = f"{message[:MAX_LIBRARY_LINE]}... ({len(message)} characters)", None
    return True
