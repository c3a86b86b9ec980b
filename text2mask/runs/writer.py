"""The writer pool: worker processes that finish items (CRF, PNGs) while the model
works on the next batch.

Its size is either fixed (``--workers N``) or, by default, sized from measured rates:
it starts with one worker and grows (up to cores - 1) when the finish time per item,
measured in the workers, exceeds what that many workers can absorb at the model side's
measured rate. On a CPU-only machine the model takes tens of seconds per photo and one
worker stays enough; a GPU producing several photos a second gets the workers it needs
without a many-core machine spawning a process per core.

Each task removes the item's completion marker, writes its record, then runs the
method's finish, which writes the outputs with the marker last. Workers are spawned
(no fork of a process holding a model), ignore SIGINT (Ctrl-C is the main process's to
handle, once), and exit when the main process dies. A worker killed by the OS breaks the
pool: the items it held become failures, the pool is started again, and the run goes on.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import statistics
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from collections import deque
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for
from pathlib import Path
from typing import Callable

from ..log import get
from .records import marker_path, write_record

log = get(__name__)

# Auto sizing: workers for the measured finish/model time ratio with this headroom
# (jitter of the CRF time per photo), judged on the median of the last WINDOW items.
HEADROOM = 1.2
WINDOW = 8


def default_workers() -> int:
    """The most writer workers a run starts by default: one core stays with the model."""
    return max((os.cpu_count() or 1) - 1, 1)


class WorkerDied(RuntimeError):
    """The writer process holding an item died (killed by the OS, e.g. out of memory)."""


def write_item(out: Path, marker: str, record: dict, finish: Callable[[Path], object]) -> float:
    """One item's files, in the order that makes the marker trustworthy; returns the
    seconds it took (the finish rate the pool is sized from)."""
    t0 = time.perf_counter()
    stale = marker_path(out, marker, record["id"])
    if stale.is_file():
        stale.unlink()
    write_record(out, record)
    finish(out)
    return time.perf_counter() - t0


def _exit_with_parent(sentinel: int) -> None:
    wait_for([sentinel])
    os._exit(1)


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent.sentinel,), daemon=True).start()


@dataclass
class Outcome:
    key: str
    error: BaseException | None = None


class WriterPool:
    """``workers`` processes (0: finish in this process; None: sized from the measured
    rates, 1 to ``cap``) with at most ``2 * workers`` tasks queued; ``submit`` blocks only
    when the queue is full. The model side reports its time with ``observe_model``."""

    def __init__(self, workers: int | None, cap: int | None = None):
        self.auto = workers is None
        self.cap = max(cap or default_workers(), 1)
        self.workers = 1 if self.auto else workers
        self.max_pending = 2 * max(self.workers, 1)
        self.pending: dict[Future, str] = {}
        self.queue_wait = 0.0
        self.restarts = 0
        self.resizes: list[dict] = []
        self._model = deque(maxlen=WINDOW)     # model seconds per item, batch by batch
        self._finish = deque(maxlen=WINDOW)    # finish seconds per item
        self._batches = 0
        self._pool = self._start() if self.workers > 0 else None

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init)

    # -- sizing ----------------------------------------------------------------------
    def rates(self) -> dict:
        """The measured medians (seconds per item), None before any measurement."""
        med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
        return {"model_seconds_per_item": med(self._model), "finish_seconds_per_item": med(self._finish)}

    def observe_model(self, seconds: float, items: int) -> None:
        """The model side took ``seconds`` for ``items`` items. The first batch (warm-up:
        lazy initialisation, first-call allocations) is not a rate."""
        self._batches += 1
        if items and self._batches > 1:
            self._model.append(seconds / items)
            self._size()

    def _size(self) -> None:
        r = self.rates()
        model, finish = r["model_seconds_per_item"], r["finish_seconds_per_item"]
        if not self.auto or self._pool is None or model is None or finish is None or len(self._finish) < 2:
            return
        needed = min(self.cap, math.ceil(HEADROOM * finish / max(model, 1e-6)))
        if needed > self.workers:
            self._grow(needed, r)

    def _grow(self, workers: int, rates: dict) -> None:
        # A new executor takes the new tasks; the old one finishes the tasks it holds
        # (their futures stay in ``pending``) and its processes then exit.
        old, self.workers = self._pool, workers
        self._pool = self._start()
        old.shutdown(wait=False)
        self.max_pending = 2 * workers
        self.resizes.append({"workers": workers, **{k: round(v, 4) for k, v in rates.items()}})
        log.info(f"writer pool: {workers} workers (finishing takes {rates['finish_seconds_per_item']:.2f} s "
                 f"per item, the model {rates['model_seconds_per_item']:.2f} s)")

    def submit(self, key: str, *args) -> list[Outcome]:
        """Queue ``write_item(*args)`` for ``key``; returns the outcomes finished so far."""
        if self._pool is None:
            try:
                self._finish.append(write_item(*args))
                return [Outcome(key)]
            except Exception as e:  # noqa: BLE001 - one item must not stop the run
                return [Outcome(key, e)]
        done: list[Outcome] = []
        t0 = time.perf_counter()
        while len(self.pending) >= self.max_pending:   # the model side stalls only here
            done += self._collect(block=True)
        self.queue_wait += time.perf_counter() - t0
        try:
            self.pending[self._pool.submit(write_item, *args)] = key
        except BrokenProcessPool:    # a worker died while idle: settle what it held, start again
            done += [self._outcome(fut) for fut in wait(list(self.pending)).done]
            self._restart()
            self.pending[self._pool.submit(write_item, *args)] = key
        return done + self._collect(block=False)

    def _collect(self, block: bool) -> list[Outcome]:
        if not self.pending:
            return []
        ready, _ = wait(list(self.pending), timeout=None if block else 0, return_when=FIRST_COMPLETED)
        out = [self._outcome(fut) for fut in ready]
        if any(isinstance(o.error, WorkerDied) for o in out):
            # A broken pool fails every task it still held; settle them all, then restart.
            out += [self._outcome(fut) for fut in wait(list(self.pending)).done]
            self._restart()
        return out

    def _outcome(self, fut: Future) -> Outcome:
        key = self.pending.pop(fut)
        try:
            self._finish.append(fut.result())
            return Outcome(key)
        except BrokenProcessPool:
            return Outcome(key, WorkerDied("the writer process died (killed by the OS, e.g. out of memory); "
                                           "re-run to redo this item"))
        except Exception as e:  # noqa: BLE001 - one item must not stop the run
            return Outcome(key, e)

    def _restart(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._start()
        self.restarts += 1

    def drain(self) -> list[Outcome]:
        out: list[Outcome] = []
        while self.pending:
            out += self._collect(block=True)
        return out

    def close(self, cancel: bool = False) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=not cancel, cancel_futures=cancel)
            self._pool = None
