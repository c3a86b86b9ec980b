"""The writer pool: worker processes that finish items (CRF, PNGs) while the model
works on the next batch.

Each task removes the item's completion marker, writes its record, then runs the
method's finish, which writes the outputs with the marker last. Workers are spawned
(no fork of a process holding a model), ignore SIGINT (Ctrl-C is the main process's to
handle, once), and exit when the main process dies. A worker killed by the OS breaks the
pool: the items it held become failures, the pool is started again, and the run goes on.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for
from pathlib import Path
from typing import Callable

from .records import marker_path, write_record


class WorkerDied(RuntimeError):
    """The writer process holding an item died (killed by the OS, e.g. out of memory)."""


def write_item(out: Path, marker: str, record: dict, finish: Callable[[Path], object]) -> str:
    """One item's files, in the order that makes the marker trustworthy."""
    stale = marker_path(out, marker, record["id"])
    if stale.is_file():
        stale.unlink()
    write_record(out, record)
    finish(out)
    return record["id"]


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
    """``workers`` processes (0: finish in this process) with at most ``2 * workers``
    tasks queued; ``submit`` blocks only when the queue is full."""

    def __init__(self, workers: int):
        self.workers = workers
        self.max_pending = 2 * max(workers, 1)
        self.pending: dict[Future, str] = {}
        self.queue_wait = 0.0
        self.restarts = 0
        self._pool = self._start() if workers > 0 else None

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init)

    def submit(self, key: str, *args) -> list[Outcome]:
        """Queue ``write_item(*args)`` for ``key``; returns the outcomes finished so far."""
        if self._pool is None:
            try:
                write_item(*args)
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
            fut.result()
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
