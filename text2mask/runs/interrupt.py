"""Ctrl-C in a training loop: finish the step, keep it, then stop.

A trainer checkpoints every N steps; without this, Ctrl-C would lose every step since the
last checkpoint (hours on a CPU). Inside ``stop_after_step()``, the first SIGINT only sets
``requested``: the loop finishes its current step, writes a checkpoint of it and raises
``KeyboardInterrupt`` (exit 130; rerunning the command resumes from that step, byte for
byte, since every draw depends on (seed, step) alone). A second SIGINT stops at once.

Used by one process only: with several (accelerate), the processes would not agree on the
step to stop at, so the handler is not installed and Ctrl-C stops at once as before.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from ..log import get

log = get(__name__)


@dataclass
class StopRequest:
    requested: bool = False


@contextmanager
def stop_after_step(enabled: bool = True) -> Iterator[StopRequest]:
    """The stop request of the loop inside; see the module docstring."""
    stop = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        log.warning("interrupted: finishing this step and writing its checkpoint (Ctrl-C again to stop at once)")

    signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
