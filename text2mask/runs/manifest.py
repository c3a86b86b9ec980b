"""run.json: what made the folder and what it holds now."""
from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict
from importlib import metadata

from .. import __version__

_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "numpy", "scipy", "pillow",
             "pydensecrf2", "pycocotools")


def versions() -> dict:
    out = {"text2mask": __version__, "python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def model_identity(info: dict) -> dict:
    """The model part of a fingerprint: a local model is its digest, not the path it was
    typed as (relative or absolute, the same weights are the same configuration); the
    device only as its kind (cpu / cuda), since results differ between kinds, not ids."""
    ident = {k: v for k, v in info.items() if k not in ("device", "model")}
    if not any(k.endswith("sha256") for k in info):
        ident["model"] = info.get("model")
    ident["device_type"] = str(info.get("device", "cpu")).split(":")[0]
    return ident


def stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


def manifest(*, method, fingerprint: dict, config: str, opts, started: float, status: str,
             summary=None, parts: list[dict] | None = None, metrics: str | None = None) -> dict:
    """The run.json document. Paths are absolute, or relative to ``cwd`` (recorded)."""
    doc = {
        "text2mask": __version__,
        "method": method.name,
        "command": sys.argv,
        "cwd": os.getcwd(),
        "started": stamp(started),
        "config": config,
        "fingerprint": fingerprint,
        **method.describe(),
        "options": {"batch_size": opts.batch_size, "limit": opts.limit,
                    "workers": "auto" if opts.workers is None else opts.workers,
                    "shard": list(opts.shard) if opts.shard else None, "overwrite": opts.overwrite,
                    "evaluate": opts.evaluate, "memory_budget": opts.memory_budget},
        "versions": versions(),
        "status": status,
        "metrics": metrics,
    }
    if parts is not None:
        doc["parts"] = [{k: p.get(k) for k in ("part", "status", "selected", "done", "skipped", "failed",
                                               "failures_file", "updated")} for p in parts]
    if summary is not None:
        s = {k: v for k, v in asdict(summary).items() if k not in ("failures", "metrics")}
        s["seconds_per_item"] = summary.seconds / summary.done if summary.done else None
        s["items_per_second"] = summary.done / summary.seconds if summary.seconds else None
        # Share of wall time the model side waited for a full writer queue: above ~0.05,
        # more writer workers (CRF cores) would speed the run up.
        s["queue_wait_share"] = summary.queue_wait_seconds / summary.seconds if summary.seconds else None
        # writer_workers / writer_sizing: the pool's size and the measured seconds per item of
        # the model side and of the writing it was sized from (writer.py).
        doc["run"] = s
    return doc
