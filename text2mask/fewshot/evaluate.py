"""Benchmark evaluation of a few-shot model over an episode manifest
(``text2mask fewshot evaluate``): the DiffewS predictor plugged into the shared batch
engine (``text2mask.runs``), which brings resume, records, failures, shards and run.json.

Per episode: read the query and supports with their masks (``prepare``), one DiffewS
call per batch of episodes with equal shots (``model_step``, which also resizes the
score map to the query's size), then in a writer process the prediction PNG, the
episode's areas at both resolutions, and optionally a picture (``finish``)::

    masks/<id>.png        prediction at the query's size: 0 background, 1 the class
    areas/<id>.json       class, I/U at the model resolution and at the original size, the
                          number of empty support masks (the episode's marker, written last)
    visual/<id>.png       supports | query | prediction | ground truth (with --visualize)
    metrics.json          per fold mIoU / FB-IoU at both resolutions (``evaluation.fewshot``)

The headline is the paper's protocol: scores at the model resolution (512²), the ground
truth resized nearest as HSNet does (``score_at="model"``); the original-size scores
stand beside it. An episode whose support mask holds no pixel of the class (after the
nearest resize the model sees) is scored as the official code does it: the model gets
the all-black support mask; such episodes are counted and reported.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..evaluation.fewshot import FewShotIoU, episode_areas, format_table
from ..io import read_json, write_index_png, write_json, write_png
from ..runs.manifest import model_identity
from ..runs.method import Evaluation
from ..runs.records import file_digest, marker_path
from .episodes import Episode, Manifest, benchmark, check_protocol, read_labelled
from .model import DiffewS, episode_inputs
from .visual import episode_strip

MARKER = "areas/{id}.json"
FOLDERS = ("masks", "areas", "visual")
SCORE_AT = ("original", "model")
DEFAULT_SCORE_AT = "model"          # the paper's protocol: DiffewS scores at 512²
MEANINGLESS = "the model has random weights (test model): these masks and metrics are MEANINGLESS"
RANDOM_BANNER = "RANDOM WEIGHTS (test model): meaningless"


@dataclass
class Prepared:
    episode: Episode
    inputs: object                  # model.EpisodeInputs
    query_rgb: np.ndarray
    gt: np.ndarray                  # (H, W) bool, the class in the query
    ignore: np.ndarray              # (H, W) bool
    supports: list                  # [(rgb, mask)] for the picture
    empty_supports: int             # support masks with no pixel of the class at the model resolution


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


def write_episode(key: str, cls: int, pred: Predicted, gt: np.ndarray, ignore: np.ndarray, empty_supports: int,
                  picture, out) -> None:
    """Module level: pickled to a writer process. The areas file is the marker: last."""
    out = Path(out)
    write_index_png(out / "masks" / f"{key}.png", pred.mask.astype(np.uint8))
    if picture is not None:
        write_png(out / "visual" / f"{key}.png", picture())
    r = pred.mask_model.shape[0]
    areas = {"id": key, "class": cls,
             "original": episode_areas(pred.mask, gt, ignore).tolist(),
             "model": episode_areas(pred.mask_model, nearest_square(gt, r), nearest_square(ignore, r)).tolist(),
             "empty_supports": empty_supports}
    write_json(out / "areas" / f"{key}.json", areas)


class FewShotEvaluation:
    """The ``text2mask.runs.Method`` of few-shot benchmark evaluation."""

    name = "fewshot"
    unit = "episode"
    all_folders = FOLDERS
    marker = MARKER
    finish_stage = "write"

    def __init__(self, model: DiffewS, manifest: Manifest, root: Path, score_at: str = DEFAULT_SCORE_AT,
                 visualize: int = 0, log=print):
        self.model, self.manifest, self.root, self.log = model, manifest, Path(root), log
        self.bench = manifest.benchmark
        self.score_at, self.visualize = score_at, visualize
        self.folders = FOLDERS if visualize else FOLDERS[:2]
        self.random_weights = bool(model.sd.info.get("random_weights"))
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
        pairs = [(s.rgb, s.mask) for s in supports]
        inputs = episode_inputs(query.rgb, pairs, self.model.config.resolution)
        # The official code feeds an empty support mask as it is (an all-black mask image).
        empty = int((~inputs.support_masks.flatten(1).any(dim=1)).sum())
        return Prepared(e, inputs, query.rgb, query.mask, query.ignore, pairs, empty)

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
                              names[p.episode.cls] if p.episode.cls < len(names) else str(p.episode.cls),
                              banner=RANDOM_BANNER if self.random_weights else None)
        return partial(write_episode, p.episode.id, p.episode.cls, result, p.gt, p.ignore, p.empty_supports,
                       picture)

    def tags(self, p: Prepared):
        return ()

    def evaluate(self, out: Path, episodes, log) -> Evaluation:
        """The fold's scores over the complete episodes, at both resolutions."""
        complete = [e.id for e in episodes if marker_path(out, MARKER, e.id).is_file()]
        if not complete:
            return Evaluation(None)
        total = len(self.manifest.episodes)
        return Evaluation(score_areas(out, complete, self.manifest.protocol, total, self.score_at, log,
                                      random_weights=self.random_weights))


def read_areas(path: Path, test_classes) -> dict:
    """One episode's ``areas/<id>.json``, schema-checked (InputError naming the file and field)."""
    a = read_json(path, "episode areas")

    def need(ok, field, value, expected):
        if not ok:
            raise InputError(f"{path}: field {field!r} must be {expected}, got {value!r}")

    need(isinstance(a, dict), "(document)", type(a).__name__, "a JSON object")
    need(a.get("class") in test_classes and isinstance(a.get("class"), int), "class", a.get("class"),
         f"a test class of the fold {list(test_classes)}")
    for at in SCORE_AT:
        v = a.get(at)
        need(isinstance(v, list) and len(v) == 2 and all(isinstance(r, list) and len(r) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in r) for r in v), at, v,
             "[[I_bg, I_fg], [U_bg, U_fg]] of non-negative integers")
        need(all(v[0][i] <= v[1][i] for i in range(2)), at, v, "intersections no larger than their unions")
    empty = a.get("empty_supports", 0)
    need(isinstance(empty, int) and not isinstance(empty, bool) and empty >= 0, "empty_supports", empty,
         "a non-negative integer")
    return a


def score_areas(out: Path, ids, protocol: dict, total: int, score_at: str, log, random_weights: bool = False) -> dict:
    """Scores of the episodes ``ids`` from their ``areas/<id>.json`` (``protocol``: the
    manifest header, for the benchmark and the fold's test classes)."""
    bench = benchmark(protocol["benchmark"])
    names = bench.class_names()
    acc = {at: FewShotIoU(protocol["test_classes"], names) for at in SCORE_AT}
    with_empty = 0
    for key in ids:
        areas = read_areas(Path(out) / "areas" / f"{key}.json", protocol["test_classes"])
        for at in SCORE_AT:
            acc[at].add(areas["class"], areas[at])
        with_empty += areas.get("empty_supports", 0) > 0
    res = {at: a.compute() for at, a in acc.items()}
    what = f"{bench.name} fold {protocol['fold']}, {protocol['shots']}-shot, {len(ids)} of {total} episodes"
    where = ("the model resolution (the paper's protocol)" if score_at == "model" else "the original size")
    title = f"{what}, scored at {where}" + (f"; {RANDOM_BANNER}" if random_weights else "")
    log(format_table(res[score_at], title))
    other = SCORE_AT[1 - SCORE_AT.index(score_at)]
    log(f"at the {'original size' if other == 'original' else 'model resolution'}: mIoU {res[other]['mIoU']:.1f}%, "
        f"FB-IoU {res[other]['FB-IoU']:.1f}%")
    if with_empty:
        log(f"{with_empty} episode(s) have a support mask with no pixel of the class at the model resolution; "
            "scored as the official code does (the model sees an all-black support mask)")
    if not protocol.get("standard"):
        log("note: not the standard protocol (1000 episodes, seed 0); not comparable with published numbers")
    if random_weights:
        log(f"WARNING: {MEANINGLESS}")
    metrics = {"benchmark": bench.name, "fold": protocol["fold"], "shots": protocol["shots"],
               "standard": protocol.get("standard"), "episodes_total": total, "score_at": score_at,
               "mIoU": res[score_at]["mIoU"], "FB-IoU": res[score_at]["FB-IoU"],
               "episodes_with_empty_support": with_empty,
               "model": res["model"], "original": res["original"], "random_weights": random_weights}
    if random_weights:
        metrics["warning"] = MEANINGLESS
    return metrics


def score_run(out: str | Path, score_at: str = DEFAULT_SCORE_AT, log=print) -> dict:
    """Re-score a finished run folder from its run.json and areas/ (e.g. once every
    shard is done) and write its metrics.json."""
    out = Path(out)
    run_json = read_json(out / "run.json", "run record",
                         not_found=f"{out}: not a few-shot evaluation folder (no run.json)")
    if not isinstance(run_json, dict) or not isinstance(run_json.get("episodes"), dict):
        raise InputError(f"{out / 'run.json'}: field 'episodes' missing: not a few-shot evaluation folder")
    protocol = check_protocol(run_json["episodes"], str(out / "run.json"))
    ids = sorted(p.stem for p in (out / "areas").glob("*.json"))
    if not ids:
        raise InputError(f"{out}: no scored episodes in areas/")
    random_weights = bool((run_json.get("model") or {}).get("random_weights"))
    metrics = score_areas(out, ids, protocol, protocol["count"], score_at, log, random_weights=random_weights)
    write_json(out / "metrics.json", metrics)
    return metrics


def evaluate(model: DiffewS, manifest: Manifest, root: Path, opts, *, score_at: str = DEFAULT_SCORE_AT,
             visualize: int = 0, log=print, dist=None):
    """Score ``model`` on the manifest's episodes into ``opts.out`` (``text2mask.runs.run``)."""
    return run_episodes(lambda say: FewShotEvaluation(model, manifest, root, score_at, visualize, say),
                        model.sd.info.get("random_weights"), manifest, opts, log=log, dist=dist)


def run_episodes(method_for, random_weights: bool, manifest: Manifest, opts, *, log=print, dist=None):
    """The manifest's episodes through the shared runner, with the evaluation method that
    ``method_for(log)`` builds (DiffewS's or DiffSeg's); only the main process logs."""
    from ..distributed import Distributed
    from ..runs import run

    dist = dist or Distributed.from_env()
    method = method_for(log if dist.main else (lambda m: None))
    if dist.main and random_weights:
        log(f"WARNING: {MEANINGLESS}")
    return run(method, manifest.episodes, opts, log=log, dist=dist)
