"""The ``text2mask`` logger: one voice for every method, written through tqdm so that a
message never breaks a progress bar.

Library code logs with ``logging.getLogger(__name__)`` (children of ``text2mask``); the
CLI calls ``setup`` once with the verbosity of ``-v``/``-q``.
"""
from __future__ import annotations

import logging

from tqdm import tqdm

LOGGER = "text2mask"


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=None)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class _Format(logging.Formatter):
    """INFO lines bare (they are the tool talking to its user); others prefixed."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"warning: {msg}"
        if record.levelno <= logging.DEBUG:
            return f"debug: {msg}"
        return msg


def setup(verbosity: int = 0) -> logging.Logger:
    """verbosity: -1 quiet (warnings and errors), 0 normal (info), 1+ debug. Idempotent."""
    logger = logging.getLogger(LOGGER)
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    logger.setLevel(level)
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(_Format())
        logger.addHandler(handler)
    logger.propagate = False
    return logger


def get(name: str = LOGGER) -> logging.Logger:
    return logging.getLogger(name if name.startswith(LOGGER) else f"{LOGGER}.{name}")
