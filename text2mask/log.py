"""The ``text2mask`` logger: one voice for every method, written to stderr through tqdm
so that a message never breaks a progress bar.

Library code logs with ``text2mask.log.get(__name__)`` (children of ``text2mask``); the
CLI calls ``setup`` once with the verbosity of ``-v``/``-q``. Long loops wrap their
iterable in ``progress``: a bar on an interactive terminal, nothing under ``-q`` or when
stderr is a file or a pipe (logs stay readable).
"""
from __future__ import annotations

import logging
import sys

from tqdm import tqdm

LOGGER = "text2mask"


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            # sys.stderr looked up per message: a test runner may have swapped it.
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class _Format(logging.Formatter):
    """INFO lines bare (they are the tool talking to its user); others prefixed. A
    record's traceback (``exc_info``) follows its line."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.ERROR:
            msg = f"error: {msg}"
        elif record.levelno >= logging.WARNING:
            msg = f"warning: {msg}"
        elif record.levelno <= logging.DEBUG:
            msg = f"debug: {msg}"
        if record.exc_info:
            msg = f"{msg}\n{self.formatException(record.exc_info)}"
        return msg


def setup(verbosity: int = 0) -> logging.Logger:
    """verbosity: -1 quiet (warnings and errors), 0 normal (info), 1+ debug (and the
    traceback of a crash). Idempotent."""
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


def progress(iterable=None, enabled: bool = True, **kwargs) -> tqdm:
    """tqdm on stderr, shown only when ``enabled``, on a terminal, and not under ``-q``."""
    quiet = not logging.getLogger(LOGGER).isEnabledFor(logging.INFO)
    return tqdm(iterable, file=sys.stderr, disable=True if quiet or not enabled else None,
                dynamic_ncols=True, **kwargs)
