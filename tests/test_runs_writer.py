"""The writer pool sizes itself from measured rates (issue 11.4): real spawned worker
processes, real files. The model side is simulated by the seconds it reports, the finish
by a task that takes a known time; the two cases differ by a factor of 20 or more, far
beyond any scheduling jitter."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from text2mask.runs.records import RECORDS, make_record
from text2mask.runs.writer import HEADROOM, WriterPool


class Finish:
    """An item's outputs: a marker file written after ``seconds`` (a CRF, for the pool)."""

    def __init__(self, key: str, seconds: float):
        self.key, self.seconds = key, seconds

    def __call__(self, out: Path) -> None:
        time.sleep(self.seconds)
        (Path(out) / "done" / f"{self.key}.txt").write_text(self.key)


def feed(pool: WriterPool, out: Path, n: int, model_seconds: float, finish_seconds: float) -> list:
    (out / "done").mkdir(parents=True)
    (out / RECORDS).mkdir()
    outcomes = []
    for i in range(n):
        key = f"item{i:02d}"
        pool.observe_model(model_seconds, 1)
        outcomes += pool.submit(key, out, "done/{id}.txt", make_record(key, "cfg", {"i": i}), Finish(key, finish_seconds))
    outcomes += pool.drain()
    pool.close()
    return outcomes


def test_pool_grows_when_writing_is_slower_than_the_model(tmp_path):
    pool = WriterPool(None, cap=3)
    assert pool.workers == 1
    outcomes = feed(pool, tmp_path, 12, model_seconds=0.02, finish_seconds=0.4)
    assert sorted(o.key for o in outcomes) == [f"item{i:02d}" for i in range(12)]
    assert all(o.error is None for o in outcomes)
    assert pool.workers == 3                       # ceil(1.2 * 0.4 / 0.02) = 24, capped at 3
    assert pool.resizes and pool.resizes[-1]["workers"] == 3
    rates = pool.rates()
    assert 0.4 <= rates["finish_seconds_per_item"] < 2.0
    assert rates["model_seconds_per_item"] == 0.02
    # Every item written once, with its record: nothing lost when the pool was replaced.
    assert sorted(p.stem for p in (tmp_path / "done").iterdir()) == [f"item{i:02d}" for i in range(12)]
    assert all(json.loads((tmp_path / RECORDS / f"item{i:02d}.json").read_text())["id"] == f"item{i:02d}"
               for i in range(12))


def test_pool_stays_at_one_worker_when_the_model_is_the_bottleneck(tmp_path):
    pool = WriterPool(None, cap=3)
    feed(pool, tmp_path, 6, model_seconds=5.0, finish_seconds=0.01)
    assert pool.workers == 1 and pool.resizes == []
    assert HEADROOM * pool.rates()["finish_seconds_per_item"] < pool.rates()["model_seconds_per_item"]


def test_fixed_pool_is_never_resized(tmp_path):
    pool = WriterPool(1)
    feed(pool, tmp_path, 6, model_seconds=0.02, finish_seconds=0.2)
    assert pool.workers == 1 and pool.resizes == [] and not pool.auto


def test_first_batch_is_not_a_rate(tmp_path):
    pool = WriterPool(0)
    pool.observe_model(30.0, 1)         # warm-up call
    assert pool.rates()["model_seconds_per_item"] is None
    pool.observe_model(3.0, 2)
    assert pool.rates()["model_seconds_per_item"] == 1.5


def test_default_cap_leaves_a_core_to_the_model():
    assert WriterPool(0).cap == max((os.cpu_count() or 1) - 1, 1)
