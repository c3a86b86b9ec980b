"""Benchmark evaluation of a few-shot model over an episode manifest
(``text2mask fewshot evaluate``): the DiffewS predictor plugged into the shared batch
engine (``text2mask.runs``), which brings resume, records, failures, shards and run.json.

Per episode: read the query and supports with their masks (``prepare``), one DiffewS
call per batch of episodes with equal shots (``model_step``, which also resizes the
score map to the query's size), then in a writer process the prediction PNG, the
episode's areas at both resolutions, and optionally a picture (``finish``)::

    masks/<id>.png        prediction at the query's size: 0 background, 1 the class
    areas/<id>.json       class, I/U at the original size and at the model resolution (marker)
    visual/<id>.png       supports | query | prediction | ground truth (with --visualize)
    metrics.json          per fold mIoU / FB-IoU at both resolutions (``evaluation.fewshot``)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from ..evaluation.fewshot import FewShotIoU, episode_areas, format_table
from ..io import write_index_png, write_json, write_png
from ..runs.manifest import model_identity
from ..runs.method import Evaluation, StageFailed
from ..runs.records import file_digest, marker_path
from .episodes import Episode, Manifest, read_labelled
from .model import DiffewS, episode_inputs
from .visual import episode_strip

MARKER = "areas/{id}.json"
FOLDERS = ("masks", "areas", "visual")
SCORE_AT = ("original", "model")


@dataclass
class Prepared:
    episode: Episode
    inputs: object                  # model.EpisodeInputs
    query_rgb: np.ndarray
    gt: np.ndarray                  # (H, W) bool, the class in the query
    ignore: np.ndarray              # (H, W) bool
    supports: list                  # [(rgb, mask)] for the picture


@dataclass
class Predicted:
    mask: np.ndarray                # (H, W) bool at the query's size
    mask_model: np.ndarray          # (R, R) bool at the model resolution


def nearest_square(a: np.ndarray, size: int) -> np.ndarray:
    """Nearest resize to size² with torch's legacy 'nearest' rule (source index
    ⌊i · in/out⌋ in float32), as HSNet resizes query masks for 512² scoring."""
    h, w = a.shape
    rows = np.minimum(np.floor(np.arange(size, dtype=np.float32) * np.float32(h / size)).astype(int), h - 1)
    cols = np.minimum(np.floor(np.arange(size, dtype=np.float32) * np.float32(w / size)).astype(int), w - 1)
    return a[rows][:, cols]


def write_episode(key: str, cls: int, pred: Predicted, gt: np.ndarray, ignore: np.ndarray, picture, out) -> None:
    """Module level: pickled to a writer process. The areas file is the marker: last."""
    out = Path(out)
    write_index_png(out / "masks" / f"{key}.png", pred.mask.astype(np.uint8))
    if picture is not None:
        write_png(out / "visual" / f"{key}.png", picture())
    r = pred.mask_model.shape[0]
    areas = {"id": key, "class": cls,
             "original": episode_areas(pred.mask, gt, ignore).tolist(),
             "model": episode_areas(pred.mask_model, nearest_square(gt, r), nearest_square(ignore, r)).tolist()}
    write_json(out / "areas" / f"{key}.json", areas)


class FewShotEvaluation:
    """The ``text2mask.runs.Method`` of few-shot benchmark evaluation."""

    name = "fewshot"
    unit = "episode"
    all_folders = FOLDERS
    marker = MARKER
    finish_stage = "write"

    def __init__(self, model: DiffewS, manifest: Manifest, root: Path, score_at: str = "original",
                 visualize: int = 0, log=print):
        self.model, self.manifest, self.root, self.log = model, manifest, Path(root), log
        self.bench = manifest.benchmark
        self.score_at, self.visualize = score_at, visualize
        self.folders = FOLDERS if visualize else FOLDERS[:2]
        self._pictured = {e.id for e in manifest.episodes[:visualize]}

    def fingerprint(self) -> dict:
        protocol = {k: v for k, v in self.manifest.protocol.items() if k not in ("data_root", "lists", "list_files")}
        return {"model": model_identity(self.model.sd.info), "method": self.model.describe(),
                "protocol": protocol, "visualize": self.visualize}

    def describe(self) -> dict:
        return {"model": self.model.sd.info, "episodes": {**self.manifest.protocol, "data_root": str(self.root)}}

    def inputs(self, e: Episode) -> dict:
        files = {}
        for name in (e.query, *e.supports):
            files[name] = [file_digest(self.bench.image_path(self.root, name), "image file"),
                           file_digest(self.bench.mask_path(self.root, name), "mask file")]
        return {"class": e.cls, "query": e.query, "supports": list(e.supports), "sha256": files}

    def prepare(self, e: Episode, inputs: dict) -> Prepared:
        query = read_labelled(self.bench, self.root, e.query, e.cls)
        supports = [read_labelled(self.bench, self.root, s, e.cls) for s in e.supports]
        empty = [s.name for s in supports if not s.mask.any()]
        if empty:
            raise StageFailed("support") from ValueError(f"support mask(s) of {', '.join(empty)} hold no pixel of class {e.cls}")
        pairs = [(s.rgb, s.mask) for s in supports]
        return Prepared(e, episode_inputs(query.rgb, pairs, self.model.config.resolution),
                        query.rgb, query.mask, query.ignore, pairs)

    def batch_key(self, p: Prepared):
        return p.inputs.shots

    def call_cost(self, p: Prepared) -> int:
        # The VAE at full resolution dominates: 2k+1 encodes and one decode, each holding
        # about 8 live fp32 tensors of 128 channels at R² (a rough upper bound, ~1 GiB at 512²).
        r = self.model.config.resolution
        return (2 * p.inputs.shots + 2) * 8 * 128 * r * r * 4

    def model_step(self, batch: list[Prepared]) -> list[Predicted]:
        scores = self.model.predict([p.inputs for p in batch])
        return [Predicted(s.mask(p.gt.shape), s.mask()) for p, s in zip(batch, scores)]

    def finish(self, p: Prepared, result: Predicted):
        picture = None
        if p.episode.id in self._pictured:
            names = self.bench.class_names()
            picture = partial(episode_strip, p.supports, p.query_rgb, result.mask, p.gt,
                              names[p.episode.cls] if p.episode.cls < len(names) else str(p.episode.cls))
        return partial(write_episode, p.episode.id, p.episode.cls, result, p.gt, p.ignore, picture)

    def tags(self, p: Prepared):
        return ()

    def evaluate(self, out: Path, episodes, log) -> Evaluation:
        """The fold's scores over the complete episodes, at both resolutions."""
        complete = [e.id for e in episodes if marker_path(out, MARKER, e.id).is_file()]
        if not complete:
            return Evaluation(None)
        total = len(self.manifest.episodes)
        return Evaluation(score_areas(out, complete, self.manifest.protocol, total, self.score_at, log))


def score_areas(out: Path, ids, protocol: dict, total: int, score_at: str, log) -> dict:
    """Scores of the episodes ``ids`` from their ``areas/<id>.json`` (``protocol``: the
    manifest header, for the benchmark and the fold's test classes)."""
    from .episodes import benchmark

    bench = benchmark(protocol["benchmark"])
    names = bench.class_names()
    acc = {at: FewShotIoU(protocol["test_classes"], names) for at in SCORE_AT}
    for key in ids:
        areas = json.loads((Path(out) / "areas" / f"{key}.json").read_text())
        for at in SCORE_AT:
            acc[at].add(areas["class"], areas[at])
    res = {at: a.compute() for at, a in acc.items()}
    what = f"{bench.name} fold {protocol['fold']}, {protocol['shots']}-shot, {len(ids)} of {total} episodes"
    where = "original size" if score_at == "original" else "model resolution"
    log(format_table(res[score_at], f"{what}, scored at the {where}"))
    other = SCORE_AT[1 - SCORE_AT.index(score_at)]
    log(f"at the {other} resolution: mIoU {res[other]['mIoU']:.1f}%, FB-IoU {res[other]['FB-IoU']:.1f}%")
    if not protocol.get("standard"):
        log("note: not the standard protocol (1000 episodes, seed 0); not comparable with published numbers")
    return {"benchmark": bench.name, "fold": protocol["fold"], "shots": protocol["shots"],
            "standard": protocol.get("standard"), "episodes_total": total, "score_at": score_at,
            "mIoU": res[score_at]["mIoU"], "FB-IoU": res[score_at]["FB-IoU"],
            "original": res["original"], "model": res["model"]}


def score_run(out: str | Path, score_at: str = "original", log=print) -> dict:
    """Re-score a finished run folder from its run.json and areas/ (e.g. once every
    shard is done) and write its metrics.json."""
    from ..errors import InputError

    out = Path(out)
    try:
        protocol = json.loads((out / "run.json").read_text())["episodes"]
    except (OSError, ValueError, KeyError):
        raise InputError(f"{out}: not a few-shot evaluation folder (no run.json with an episodes section)") from None
    ids = sorted(p.stem for p in (out / "areas").glob("*.json"))
    if not ids:
        raise InputError(f"{out}: no scored episodes in areas/")
    metrics = score_areas(out, ids, protocol, protocol["count"], score_at, log)
    write_json(out / "metrics.json", metrics)
    return metrics

def evaluate(model: DiffewS, manifest: Manifest, root: Path, opts, *, score_at: str = "original",
             visualize: int = 0, log=print, dist=None):
    """Score ``model`` on the manifest's episodes into ``opts.out`` (``text2mask.runs.run``)."""
    from ..distributed import Distributed
    from ..runs import run

    dist = dist or Distributed.from_env()
    method = FewShotEvaluation(model, manifest, root, score_at, visualize, log if dist.main else (lambda m: None))
    if dist.main and model.sd.info.get("random_weights"):
        log("WARNING: the model has random weights (test model): these masks and metrics are MEANINGLESS")
    return run(method, manifest.episodes, opts, log=log, dist=dist)
