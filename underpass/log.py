"""Structured logging set-up shared by every Underpass process.

structlog renders JSON when stderr is not a terminal (containers, CI, files)
and a readable key=value line on a terminal; ``UNDERPASS_LOG_FORMAT=json|console``
overrides the choice. Secrets never go to the log: callers log identities and
serials, never keys or tokens, and :func:`redact` guards the obvious keys.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = frozenset({"token", "authorization", "key", "private_key", "password", "secret"})
LEVELS = ("debug", "info", "warning", "error", "critical")


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: replace values of secret-looking keys."""
    for name in list(event):
        if name.lower() in _SECRET_KEYS:
            event[name] = "[redacted]"
    return event


def configure(level: str = "info", fmt: str | None = None) -> None:
    """Configure structlog (and stdlib logging, for libraries) for this process."""
    fmt = fmt or os.environ.get("UNDERPASS_LOG_FORMAT")
    if fmt is None:
        fmt = "console" if sys.stderr.isatty() else "json"
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LEVELS)}")
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(
        level=numeric, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s"
    )


def set_level(level: str) -> None:
    """Change the level at run time (admin ``/logging``), keeping the format and output.

    Loggers obtained earlier follow at once (structlog loggers are not cached).
    Raises ValueError for a level outside :data:`LEVELS`.
    """
    name = level.lower()
    if name not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LEVELS)}")
    numeric = logging.getLevelName(name.upper())
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(numeric))
    logging.getLogger().setLevel(numeric)


def current_level() -> str:
    """The level structlog filters at now, as a name of :data:`LEVELS`."""
    try:
        numeric = int(structlog.get_logger().get_effective_level())
    except AttributeError:  # a wrapper class without levels: fall back to stdlib's
        numeric = logging.getLogger().getEffectiveLevel()
    if numeric <= logging.DEBUG:
        return "debug"
    name = str(logging.getLevelName(numeric)).lower()
    return name if name in LEVELS else str(numeric)
