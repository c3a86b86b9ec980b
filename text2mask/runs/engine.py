"""The batch engine: claim the folder, decide what to do, then producer -> model step ->
writer pool, and finally the records (status, metrics, run.json).

    run(method, items, opts)
      claim()                  one configuration per folder (folder.py)
      plan_resume()            which items are finished, changed, made by another config
      BatchRun.process()
        produce()              prepare items, bucket them by batch key, within the budget
        model_step()           a batch -> results; on failure one by one, so only the culprit fails
        WriterPool.submit()    record, outputs, marker last, in worker processes
      _close()                 status of this job, union over jobs, metrics, run.json
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..distributed import Distributed
from ..errors import ConfigError
from ..io import write_json
from ..log import progress as progress_bar
from . import folder as F
from .failures import FailureLog, failures_name
from .manifest import manifest, stamp
from .method import Method, StageFailed
from .records import RECORDS, ResumePlan, State, compare_inputs, config_digest, make_record, marker_path, stored_state
from .writer import WriterPool


@dataclass
class RunOptions:
    out: Path
    batch_size: int = 1
    workers: int | None = None     # writer processes; None: sized from the measured rates (writer.py)
    limit: int | None = None
    overwrite: bool = False
    shard: tuple[int, int] | None = None     # (index, count), 0-based index
    evaluate: bool = True
    progress: bool = True
    memory_budget: int | None = None          # bytes one model call may use; None: no limit


@dataclass
class RunSummary:
    total: int = 0
    done: int = 0             # written by this run
    skipped: int = 0          # already complete from an earlier run
    failed: int = 0
    tags: dict[str, int] = field(default_factory=dict)       # counts of written items per method tag
    redone_changed: list[str] = field(default_factory=list)  # finished before, redone: the input changed
    redone_stale: list[str] = field(default_factory=list)    # finished by another configuration, or unrecorded
    no_gt: list[str] = field(default_factory=list)           # not scored: no ground truth
    seconds: float = 0.0
    model_seconds: float = 0.0
    queue_wait_seconds: float = 0.0
    worker_restarts: int = 0
    writer_workers: int = 0                                   # the pool's final size
    writer_sizing: dict = field(default_factory=dict)         # measured rates and resizes
    failures: list[dict] = field(default_factory=list)
    failures_file: str | None = None
    metrics: dict | None = None
    status: str = "running"
    errors: list[str] = field(default_factory=list)          # run records that could not be written


class MemoryBudgetExceeded(ConfigError):
    """One item needs more memory than ``--memory-budget`` allows."""


def shard_of(key: str, count: int) -> int:
    """Stable assignment of an item to one of ``count`` shards (independent of order)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % count


def select(items: Sequence, limit: int | None, shard: tuple[int, int] | None) -> list:
    chosen = list(items[:limit]) if limit else list(items)
    if shard is not None:
        index, count = shard
        chosen = [s for s in chosen if shard_of(s.id, count) == index]
    return chosen


# -- 2. what is left to do -------------------------------------------------------------

def plan_resume(method: Method, out: Path, items: Sequence, config: str, overwrite: bool) -> ResumePlan:
    """Items whose marker, record and inputs all agree are complete; the rest are to do.
    The inputs of a finished item are read again (labels, photo digest): cheap next to
    the model, and the only way to notice a corrected label or a replaced photo."""
    plan = ResumePlan()
    for item in items:
        if overwrite:
            plan.todo.append((item, None))
            continue
        state, rec = stored_state(out, item.id, method.marker, config)
        inputs = None
        if state is State.COMPLETE:
            try:
                inputs = method.inputs(item)
            except Exception:  # noqa: BLE001 - it fails again, with its message, when redone
                state = State.CHANGED
            else:
                state = compare_inputs(rec, inputs)
        if state is State.COMPLETE:
            plan.complete.append(item.id)
            continue
        if state is State.CHANGED:
            plan.changed.append(item.id)
        elif state in (State.OTHER_CONFIG, State.UNRECORDED):
            plan.other_config.append(item.id)
        plan.todo.append((item, inputs))
    return plan


# -- 3. producer and model step ----------------------------------------------------------

@dataclass
class Work:
    """One prepared item on its way through the model step to the writer."""

    key: str
    inputs: dict
    prepared: Any


@dataclass
class Failure:
    key: str
    stage: str
    error: BaseException | str


def _prepare(method: Method, item, inputs: dict | None) -> Work | Failure:
    try:
        inputs = method.inputs(item) if inputs is None else inputs
        return Work(item.id, inputs, method.prepare(item, inputs))
    except StageFailed as e:
        return Failure(item.id, e.stage, e.__cause__ or e)
    except Exception as e:  # noqa: BLE001 - one item must not stop the run
        return Failure(item.id, "read", e)


def produce(method: Method, todo: Sequence, batch_size: int, budget: int | None) -> Iterator[list[Work] | Failure]:
    """Prepared items in batches of one batch key, at most ``batch_size`` items and
    ``budget`` bytes per model call; an item's failure is yielded in place of it."""
    buckets: dict[Any, tuple[list[Work], int]] = {}
    for item, inputs in todo:
        work = _prepare(method, item, inputs)
        if isinstance(work, Failure):
            yield work
            continue
        cost = method.call_cost(work.prepared)
        if budget is not None and cost > budget:
            yield Failure(work.key, "model", MemoryBudgetExceeded(
                f"needs about {cost / 2**30:.2f} GiB in one model call, over --memory-budget "
                f"{budget / 2**30:.2f} GiB"))
            continue
        key = method.batch_key(work.prepared)
        batch, used = buckets.pop(key, ([], 0))
        if batch and budget is not None and used + cost > budget:
            yield batch
            batch, used = [], 0
        batch.append(work)
        used += cost
        if len(batch) >= batch_size:
            yield batch
        else:
            buckets[key] = (batch, used)
    for batch, _ in buckets.values():
        yield batch


def model_step(method: Method, batch: list[Work]) -> list[tuple[Work, Any]]:
    """(work, result) pairs; a failing batch is retried item by item, so that only the
    culprit fails (its result is then a Failure)."""
    try:
        results = method.model_step([w.prepared for w in batch])
    except Exception as e:  # noqa: BLE001
        if len(batch) == 1:
            return [(batch[0], Failure(batch[0].key, "model", e))]
        return [pair for w in batch for pair in model_step(method, [w])]
    return list(zip(batch, results))


class Progress:
    """tqdm over this job's items; under several processes the main one shows the global
    count, read from the markers every few seconds."""

    def __init__(self, total: int, out: Path, marker: str, ids: set[str] | None, disable: bool, unit: str):
        self.bar = progress_bar(total=total, enabled=not disable, unit=unit)
        self.out, self.marker, self.ids, self.last = Path(out), marker, ids, 0.0

    def update(self, n: int) -> None:
        if self.ids is None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last > 2.0:
            self.last = now
            done = sum(1 for key in self.ids if marker_path(self.out, self.marker, key).is_file())
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


class BatchRun:
    """The loop of one process: batches through the model step into the writer pool."""

    def __init__(self, method: Method, out: Path, config: str, claim: F.Claim, pool: WriterPool,
                 failures: FailureLog, summary: RunSummary, progress: Progress):
        self.method, self.out, self.config, self.claim = method, out, config, claim
        self.pool, self.failures, self.summary, self.progress = pool, failures, summary, progress
        self._tags: dict[str, tuple[str, ...]] = {}

    def process(self, todo: Sequence, batch_size: int, budget: int | None) -> None:
        for batch in produce(self.method, todo, batch_size, budget):
            if isinstance(batch, Failure):
                self._fail(batch)
                continue
            self.claim.verify()
            self._run_batch(batch)
        self._settle(self.pool.drain())

    def _run_batch(self, batch: list[Work]) -> None:
        t0 = time.perf_counter()
        pairs = model_step(self.method, batch)
        seconds = time.perf_counter() - t0
        self.summary.model_seconds += seconds
        self.pool.observe_model(seconds, len(batch))
        for work, result in pairs:
            if isinstance(result, Failure):
                self._fail(result)
                continue
            self._tags[work.key] = tuple(self.method.tags(work.prepared))
            record = make_record(work.key, self.config, work.inputs)
            task = self.method.finish(work.prepared, result)
            self._settle(self.pool.submit(work.key, self.out, self.method.marker, record, task))

    def _settle(self, outcomes) -> None:
        for o in outcomes:
            tags = self._tags.pop(o.key, ())
            if o.error is not None:
                self._fail(Failure(o.key, self.method.finish_stage, o.error))
                continue
            self.summary.done += 1
            for t in tags:
                self.summary.tags[t] = self.summary.tags.get(t, 0) + 1
            self.progress.update(1)

    def _fail(self, f: Failure) -> None:
        self.summary.failures.append(self.failures.add(f.key, f.stage, f.error))
        self.progress.update(1)


# -- 1..5. the run ------------------------------------------------------------------------

def run(method: Method, items: Sequence, opts: RunOptions, *, log=print, dist: Distributed | None = None,
        summary_type: type[RunSummary] = RunSummary) -> RunSummary:
    """Outputs of ``method`` for ``items`` into ``opts.out``. Under a multi-process
    launcher each process takes its share; the main one writes the folder's records."""
    started = time.time()
    dist = dist or Distributed.from_env()
    out = Path(opts.out)
    if dist.world > 1 and opts.shard is not None:
        raise ConfigError("--shard and a multi-process launch cannot be combined")
    if not dist.main:
        log = lambda msg: None  # noqa: E731 - one voice per run

    # 1. Claim the folder for this configuration.
    fp = method.fingerprint()
    config = config_digest(fp)
    F.check_writable(out)
    claim = F.claim(out, fp, config, opts.overwrite)
    try:
        return _run_claimed(method, items, opts, log, dist, summary_type, started, out, fp, config, claim)
    finally:
        claim.release()


def _run_claimed(method, items, opts, log, dist, summary_type, started, out, fp, config, claim) -> RunSummary:
    # 2. This job's items and what is left of them.
    selected = select(items, opts.limit, opts.shard)
    mine = selected if dist.world == 1 else [s for s in selected if shard_of(s.id, dist.world) == dist.rank]
    plan = plan_resume(method, out, mine, config, opts.overwrite)
    todo_ids = [item.id for item, _ in plan.todo]
    everyone = dist.gather((len(plan.complete), todo_ids, plan.changed, plan.other_config))
    all_todo = {k for _, ids, _, _ in everyone for k in ids}
    summary = summary_type(total=len(mine), skipped=len(plan.complete),
                           redone_changed=sorted(k for _, _, c, _ in everyone for k in c) if dist.main else plan.changed,
                           redone_stale=sorted(k for _, _, _, o in everyone for k in o) if dist.main else plan.other_config)
    failures = FailureLog(out / failures_name(opts.shard))
    summary.failures_file = str(failures.path.absolute())
    part = F.part_name(opts.shard)

    # 3. Prepare the folder (main process): stale outputs aside, run.json "running".
    dist.barrier()      # every process has looked at the folder before it changes
    if dist.main:
        _prepare_folder(method, out, opts, log, failures, {s.id for s in items} - all_todo, bool(all_todo))
        _announce(method, log, len(selected), sum(c for c, *_ in everyone), summary)
        _write_part(out, part, config, claim, opts, summary, "running", len(selected))
        _try_write(summary, out / "run.json", manifest(method=method, fingerprint=fp, config=config, opts=opts,
                                                        started=started, status="running"), fatal=True)
    dist.barrier()

    # 4. The batches.
    pool = WriterPool(opts.workers)
    progress = Progress(len(all_todo), out, method.marker, all_todo if dist.world > 1 else None,
                        disable=not opts.progress or not dist.main, unit=method.unit[:3])
    batch_run = BatchRun(method, out, config, claim, pool, failures, summary, progress)
    try:
        batch_run.process(plan.todo, opts.batch_size, opts.memory_budget)
    except BaseException as e:
        pool.close(cancel=True)
        progress.close()
        if dist.main:
            summary.status = "interrupted" if isinstance(e, KeyboardInterrupt) else "crashed"
            _write_part(out, part, config, claim, opts, summary, summary.status, len(selected), quiet=True)
        raise
    pool.close()
    progress.close()
    summary.queue_wait_seconds, summary.worker_restarts = pool.queue_wait, pool.restarts
    summary.writer_workers = pool.workers
    summary.writer_sizing = {"auto": pool.auto, "cap": pool.cap, **pool.rates(), "resizes": pool.resizes}
    summary.seconds = time.time() - started

    # 5. Records of the whole folder.
    summary = _combine(dist.gather(summary), summary)
    dist.barrier()
    if dist.main:
        _close(method, items, selected, opts, log, out, fp, config, claim, part, failures, summary, started)
    return summary


def _prepare_folder(method, out: Path, opts: RunOptions, log, failures: FailureLog, untouched: set[str],
                    writes: bool) -> None:
    failures.reset(untouched)
    for f in method.folders:
        (out / f).mkdir(exist_ok=True)
    (out / RECORDS).mkdir(exist_ok=True)
    F.remove_stale_temp_files(out, (*method.all_folders, RECORDS, F.STATUS))
    unused = [f for f in method.all_folders if f not in method.folders]
    F.set_aside(out, unused, "this configuration does not write it", log)
    if writes:
        F.set_aside(out, ["metrics.json"], "the outputs it scored are being rewritten", log)


def _announce(method, log, selected: int, complete: int, summary: RunSummary) -> None:
    unit = method.unit
    if complete:
        log(f"resuming: {complete} of {selected} {unit}s already complete")
    if summary.redone_changed:
        log(f"redoing {len(summary.redone_changed)} {unit}(s) whose input changed since they were written: "
            + ", ".join(summary.redone_changed[:10]) + (" ..." if len(summary.redone_changed) > 10 else ""))
    if summary.redone_stale:
        log(f"redoing {len(summary.redone_stale)} {unit}(s) written by another configuration or without a record "
            "(e.g. an interrupted --overwrite)")


def _write_part(out: Path, part: str, config: str, claim: F.Claim, opts: RunOptions, summary: RunSummary,
                status: str, selected: int, quiet: bool = False) -> None:
    doc = {"part": part, "config": config, "status": status, "shard": list(opts.shard) if opts.shard else None,
           "limit": opts.limit, "selected": selected, "done": summary.done, "skipped": summary.skipped,
           "failed": len(summary.failures), "redone_changed": summary.redone_changed,
           "failures_file": summary.failures_file, "holder": claim.holder.path.name, "updated": stamp(time.time())}
    if quiet:
        try:
            F.write_part(out, part, doc)
        except OSError:
            pass
        return
    _try_write(summary, out / F.STATUS / f"{part}.json", doc)


def _try_write(summary: RunSummary, path: Path, doc: dict, fatal: bool = False) -> bool:
    """Write a record of the run; a full disk becomes an error in the summary (the
    outputs are safe and the folder resumable), or stops the run before any work."""
    try:
        write_json(path, doc)
        return True
    except OSError as e:
        msg = f"{path}: cannot write ({e.strerror or e})"
        if fatal:
            from ..errors import InputError

            raise InputError(msg) from None
        summary.errors.append(msg)
        return False


def _combine(parts: list[RunSummary], mine: RunSummary) -> RunSummary:
    """The whole run's counts from every process's summary (wall time: the slowest)."""
    if len(parts) == 1:
        return parts[0]
    total = type(mine)(redone_changed=mine.redone_changed, redone_stale=mine.redone_stale,
                       failures_file=mine.failures_file, writer_sizing=mine.writer_sizing)
    for p in parts:
        for k in ("total", "done", "skipped", "model_seconds", "queue_wait_seconds", "worker_restarts",
                  "writer_workers"):
            setattr(total, k, getattr(total, k) + getattr(p, k))
        for t, n in p.tags.items():
            total.tags[t] = total.tags.get(t, 0) + n
        total.failures.extend(p.failures)
        total.errors.extend(p.errors)
        total.seconds = max(total.seconds, p.seconds)
    return total


def _close(method, items, selected, opts, log, out, fp, config, claim, part, failures, summary, started) -> None:
    summary.failed = len(summary.failures)
    if opts.evaluate and opts.shard is None:
        ev = method.evaluate(out, selected, log)
        summary.no_gt = ev.no_gt
        for what, message in ev.errors:
            summary.failures.append(failures.add(what, "evaluate", message))
        summary.failed = len(summary.failures)
        if ev.metrics is not None and _try_write(summary, out / "metrics.json", ev.metrics):
            summary.metrics = ev.metrics
    elif opts.shard is not None:
        log("shard done; once every shard has finished, the same command without --shard scores the whole "
            "folder (it finds every item complete and writes only the metrics)")
    if failures.unwritten:
        summary.errors.append(f"{failures.path}: {failures.unwritten} failure line(s) could not be written")
    mine = "failed" if summary.failed else "complete"
    _write_part(out, part, config, claim, opts, summary, mine, len(selected))
    parts = F.read_parts(out, config)
    limits = [p.get("limit") for p in parts] or [opts.limit]
    whole = select(items, None if None in limits else max(limits), None)
    missing = [s.id for s in whole if not marker_path(out, method.marker, s.id).is_file()]
    summary.status = F.union_status(out, [p for p in parts if p.get("part") != part] + [{"status": mine,
                                    "failed": summary.failed}], missing)
    metrics = "metrics.json" if (out / "metrics.json").is_file() else None
    doc = manifest(method=method, fingerprint=fp, config=config, opts=opts, started=started,
                   status=summary.status, summary=summary, parts=parts, metrics=metrics)
    doc["missing"] = {"count": len(missing), "first": missing[:20]}
    _try_write(summary, out / "run.json", doc)
