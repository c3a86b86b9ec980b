"""Batch pseudo-labelling of a dataset: the loop behind ``text2mask generate``.

The model works on batch k+1 while worker processes run the CRF and write batch k
(bounded queue). One image's failure is recorded in ``failures.jsonl`` and the run goes
on. Finished images (``masks/<id>.png`` present) are skipped on a re-run, and per-image
seeds make the resumed outputs identical to an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from importlib import metadata
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import __version__
from ..data.base import Dataset, Sample
from ..distributed import Distributed
from ..evaluation.semantic import evaluate_dirs, format_table
from ..errors import ConfigMismatch, InputError
from ..io import read_image, write_json, write_text
from .predictor import Text2Mask
from ..preprocess import geometry, shrink
from .result import Attention, background_only
from .write import FOLDERS, finish, is_complete, output_path


def default_workers() -> int:
    return max((os.cpu_count() or 1) - 1, 0)


@dataclass
class RunOptions:
    out: Path
    batch_size: int = 1
    workers: int = field(default_factory=default_workers)
    limit: int | None = None
    overwrite: bool = False
    shard: tuple[int, int] | None = None     # (index, count), 0-based index
    evaluate: bool = True
    progress: bool = True
    max_pixels: int | None = 4_000_000  # larger photos are worked on shrunk (masks written full size)


@dataclass
class RunSummary:
    total: int = 0
    done: int = 0             # written by this run
    skipped: int = 0          # already complete from an earlier run
    failed: int = 0
    no_labels: int = 0        # of ``done``: images without labels, written all-background
    seconds: float = 0.0
    model_seconds: float = 0.0
    queue_wait_seconds: float = 0.0
    failures: list[dict] = field(default_factory=list)
    metrics: dict | None = None


def shard_of(key: str, count: int) -> int:
    """Stable assignment of an image to one of ``count`` shards (independent of order)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % count


def select(dataset: Dataset, limit: int | None, shard: tuple[int, int] | None) -> list[Sample]:
    samples = dataset.samples[:limit] if limit else list(dataset.samples)
    if shard is not None:
        index, count = shard
        samples = [s for s in samples if shard_of(s.id, count) == index]
    return samples


def versions() -> dict:
    out = {"text2mask": __version__, "python": platform.python_version()}
    for pkg in ("torch", "diffusers", "transformers", "accelerate", "numpy", "scipy", "pillow",
                "pydensecrf2", "pycocotools"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def fingerprint(predictor: Text2Mask, dataset: Dataset) -> dict:
    """Everything that changes the masks. A resumed run must match it exactly."""
    cs = predictor.class_set
    model = {k: v for k, v in predictor.sd.info.items() if k != "device"}
    return {
        "model": model,
        "method": asdict(predictor.config),
        "class_set": {"name": cs.name, "classes": [asdict(c) for c in cs.classes]},
        "dataset": {"name": dataset.name, "split": dataset.split, "labels": dataset.label_source},
    }


def check_writable(out: Path) -> None:
    """Fail before any model work when the output folder cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"{out}: output folder is not writable ({e.strerror or e})") from None


def _remove_stale_temp_files(out: Path, older_than: float = 600.0) -> None:
    """Temp files a killed run left mid-write; young ones may belong to a shard still running."""
    now = time.time()
    for folder in FOLDERS:
        for tmp in (out / folder).glob(".*.tmp"):
            try:
                if now - tmp.stat().st_mtime > older_than:
                    tmp.unlink()
            except FileNotFoundError:
                pass


def _check_output(out: Path, fp: dict, overwrite: bool) -> None:
    check_writable(out)
    manifest = out / "run.json"
    if overwrite or not manifest.is_file():
        return
    try:
        old = json.loads(manifest.read_text()).get("fingerprint")
    except json.JSONDecodeError:
        old = None
    if old != json.loads(json.dumps(fp)):
        diff = sorted(k for k in fp if (old or {}).get(k) != json.loads(json.dumps(fp[k])))
        raise ConfigMismatch(
            f"{out} holds outputs of a different configuration (differs in: {', '.join(diff) or 'run.json'}); "
            "refusing to mix results. Use another --out, or --overwrite to redo every image.")


class _Failures:
    """failures file: one JSON line per failed image (id, stage, error), appended as they
    happen (single short appends, so several processes can share the file)."""

    def __init__(self, path: Path):
        self.path = path

    def reset(self, keep_ids: set[str]) -> None:
        """Start this run's record, keeping earlier failures of images it does not touch."""
        kept = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["id"] in keep_ids:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass
        write_text(self.path, "".join(line + "\n" for line in kept))

    def add(self, key: str, stage: str, error: BaseException | str) -> dict:
        msg = error if isinstance(error, str) else (str(error) or type(error).__name__)
        if not isinstance(error, (str, InputError)):
            msg = f"{type(error).__name__}: {msg}"
        rec = {"id": key, "stage": stage, "error": msg}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec


def _manifest(out: Path, fp: dict, predictor: Text2Mask, dataset: Dataset, opts: RunOptions,
              summary: RunSummary | None, started: float) -> None:
    doc = {
        "text2mask": __version__,
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "fingerprint": fp,
        "seed": predictor.config.seed,
        "model": predictor.sd.info,
        "dataset": {"name": dataset.name, "split": dataset.split, "images": len(dataset),
                    "image_dir": _common_parent([s.image for s in dataset.samples]),
                    "label_source": dataset.label_source,
                    "gt_dir": str(dataset.gt_dir) if dataset.gt_dir else None,
                    "class_set": predictor.class_set.source},
        "options": {"batch_size": opts.batch_size, "workers": opts.workers, "limit": opts.limit,
                    "shard": list(opts.shard) if opts.shard else None},
        "versions": versions(),
        "status": "running" if summary is None else ("failed" if summary.failed else "complete"),
    }
    if summary is not None:
        s = {k: v for k, v in asdict(summary).items() if k not in ("failures", "metrics")}
        s["seconds_per_image"] = summary.seconds / summary.done if summary.done else None
        s["images_per_second"] = summary.done / summary.seconds if summary.seconds else None
        doc["run"] = s
    write_json(out / "run.json", doc)


def _common_parent(paths: list[Path]) -> str | None:
    parents = {str(p.parent) for p in paths}
    return parents.pop() if len(parents) == 1 else None


def generate(predictor: Text2Mask, dataset: Dataset, opts: RunOptions, log=print,
             dist: Distributed | None = None) -> RunSummary:
    """Pseudo masks for ``dataset`` into ``opts.out``. Under a multi-process launcher each
    process takes its share of the images; the main one writes run.json and metrics.json."""
    started = time.time()
    dist = dist or Distributed.from_env()
    out = Path(opts.out)
    fp = fingerprint(predictor, dataset)
    _check_output(out, fp, opts.overwrite)
    if dist.world > 1 and opts.shard is not None:
        raise ValueError("--shard and a multi-process launch cannot be combined")
    if not dist.main:
        log = lambda msg: None  # noqa: E731 - one voice per run
    if predictor.sd.info.get("random_weights"):
        log("WARNING: the model has random weights (test model): these masks and metrics are MEANINGLESS")
    for note in dataset.notes:
        log(f"note: {note}")
    log(f"labels from {dataset.label_source}")

    selected = select(dataset, opts.limit, opts.shard)   # this job's images (all ranks)
    pending_ids = {s.id for s in selected if opts.overwrite or not is_complete(out, s.id)}
    mine = selected if dist.world == 1 else [s for s in selected if shard_of(s.id, dist.world) == dist.rank]
    todo = [s for s in mine if s.id in pending_ids]
    summary = RunSummary(total=len(mine), skipped=len(mine) - len(todo))
    failures = _Failures(out / ("failures.jsonl" if opts.shard is None
                                else f"failures-shard{opts.shard[0]}of{opts.shard[1]}.jsonl"))
    dist.barrier()  # every process has checked the folder before the main one writes to it
    if dist.main:
        failures.reset({s.id for s in dataset.samples} - pending_ids)
        for f in FOLDERS:
            (out / f).mkdir(exist_ok=True)
        _remove_stale_temp_files(out)
        _manifest(out, fp, predictor, dataset, opts, None, started)
        if len(pending_ids) < len(selected):
            log(f"resuming: {len(selected) - len(pending_ids)} of {len(selected)} images already complete")
    dist.barrier()

    pool = (ProcessPoolExecutor(opts.workers, mp_context=get_context("spawn"))
            if opts.workers > 0 else None)
    pending: dict[Future, str] = {}
    max_pending = 2 * max(opts.workers, 1)
    bar = _Progress(len(pending_ids), out, pending_ids if dist.world > 1 else None,
                    disable=not opts.progress or not dist.main)
    cfg = predictor.config

    def collect(block: bool) -> None:
        if not pending:
            return
        ready, _ = wait(list(pending), timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for fut in ready:
            key = pending.pop(fut)
            try:
                fut.result()
                summary.done += 1
            except Exception as e:  # noqa: BLE001 - one image must not stop the run
                summary.failures.append(failures.add(key, "crf/write", e))
            bar.update(1)

    full_size: dict[str, tuple[int, int] | None] = {}

    def submit(att: Attention, rgb: np.ndarray) -> None:
        att.full_size = full_size.pop(att.key, None)
        if pool is None:
            try:
                finish(att, rgb, cfg, out)
                summary.done += 1
            except Exception as e:  # noqa: BLE001
                summary.failures.append(failures.add(att.key, "crf/write", e))
            bar.update(1)
            return
        t0 = time.perf_counter()
        while len(pending) >= max_pending:  # the model side stalls only here: queue full
            collect(block=True)
        summary.queue_wait_seconds += time.perf_counter() - t0
        pending[pool.submit(finish, att, rgb, cfg, out)] = att.key
        collect(block=False)

    def fail(key: str, stage: str, e: BaseException) -> None:
        summary.failures.append(failures.add(key, stage, e))
        bar.update(1)

    def run_model(batch: list[tuple[str, np.ndarray, object]]) -> None:
        t0 = time.perf_counter()
        try:
            results = predictor.attend(batch)
        except Exception as e:  # noqa: BLE001
            if len(batch) == 1:
                fail(batch[0][0], "model", e)
            else:  # retry one by one, so that only the culprit fails
                for item in batch:
                    run_model([item])
            return
        finally:
            summary.model_seconds += time.perf_counter() - t0
        for (_, rgb, _), att in zip(batch, results):
            submit(att, rgb)

    buckets: dict[tuple[int, int], list] = {}
    try:
        for s in todo:
            try:
                classes = dataset.labels(s)
                photo = read_image(s.image)
            except Exception as e:  # noqa: BLE001
                fail(s.id, "read", e)
                continue
            rgb = shrink(photo, opts.max_pixels)
            full_size[s.id] = photo.shape[:2] if rgb is not photo else None
            del photo
            if not classes:
                log(f"{s.id}: no image-level labels; writing an all-background mask")
                summary.no_labels += 1
                submit(background_only(s.id, *rgb.shape[:2]), rgb)
                continue
            try:
                plan = predictor.plan(classes)
            except Exception as e:  # noqa: BLE001
                fail(s.id, "prompt", e)
                continue
            if plan.actions:
                log(f"{s.id}: prompt too long for 77 tokens: " + "; ".join(plan.actions))
            geo = geometry(*rgb.shape[:2])
            bucket = buckets.setdefault((geo.padded_height, geo.padded_width), [])
            bucket.append((s.id, rgb, plan))
            if len(bucket) >= opts.batch_size:
                run_model(buckets.pop((geo.padded_height, geo.padded_width)))
        for size in list(buckets):
            run_model(buckets.pop(size))
        while pending:
            collect(block=True)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    summary.seconds = time.time() - started
    summary = _combine(dist.gather(summary))
    dist.barrier()
    if not dist.main:
        return summary
    if opts.evaluate and dataset.gt_dir is not None and opts.shard is None:
        summary.metrics = evaluate_run(out, dataset, selected, log)
        for folder, m in (summary.metrics or {}).items():
            if isinstance(m, dict) and "error" in m:
                summary.failures.append(failures.add(f"({folder}/ evaluation)", "evaluate", m["error"]))
    elif opts.shard is not None:
        log("shard done; once every shard has finished, `text2mask evaluate` scores the whole folder")
    summary.failed = len(summary.failures)
    _manifest(out, fp, predictor, dataset, opts, summary, started)
    return summary


def _combine(parts: list[RunSummary]) -> RunSummary:
    """The whole run's counts from every process's summary (wall time: the slowest)."""
    total = RunSummary()
    for p in parts:
        for k in ("total", "done", "skipped", "no_labels", "model_seconds", "queue_wait_seconds"):
            setattr(total, k, getattr(total, k) + getattr(p, k))
        total.failures.extend(p.failures)
        total.seconds = max(total.seconds, p.seconds)
    total.failed = len(total.failures)
    return total


class _Progress:
    """tqdm with images/s; under several processes the main one shows the global count,
    read from the finished masks every few seconds."""

    def __init__(self, total: int, out: Path, ids: set[str] | None, disable: bool):
        self.bar = tqdm(total=total, unit="img", disable=disable, dynamic_ncols=True)
        self.out, self.ids, self.last = out, ids, 0.0

    def update(self, n: int) -> None:
        if self.ids is None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last > 2.0:
            self.last = now
            done = sum(1 for name in os.listdir(self.out / "masks") if name[:-4] in self.ids)
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def evaluate_run(out: Path, dataset: Dataset, samples: list[Sample], log=print) -> dict | None:
    """Metrics of initial/, crf/ and masks/ over the images that have outputs and GT."""
    ids = [s.id for s in samples if s.gt is not None and is_complete(out, s.id)]
    if not ids:
        return None
    names = dataset.class_set.names
    metrics = {"split": dataset.split, "images": len(ids), "gt_dir": str(dataset.gt_dir)}
    for folder in FOLDERS:
        if not all(output_path(out, folder, i).is_file() for i in ids):
            continue
        try:
            res = evaluate_dirs(out / folder, dataset.gt_dir, ids=ids, num_classes=len(names), class_names=names)
        except InputError as e:  # e.g. a GT of another size: the masks stay, the numbers can't be had
            log(f"error: cannot evaluate {folder}/: {e}")
            metrics[folder] = {"error": str(e)}
            continue
        metrics[folder] = res
        log(format_table(res, f"{folder}/ vs ground truth ({dataset.name} {dataset.split}, {len(ids)} images)"))
    write_json(out / "metrics.json", metrics)
    return metrics
