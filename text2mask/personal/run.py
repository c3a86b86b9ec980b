"""Dataset run of personalized referring segmentation (``text2mask refer --data-root``),
plugged into the shared batch engine (``text2mask.runs``).

An item is a scene photo with its triplets in the split (they form the af group):
``prepare`` reads the photo, ``model_step`` runs the ``Referrer``, ``finish`` writes

    masks/<triplet>.png      0/1, the af segment        masks_bf/<triplet>.png   the bf segment
    scores/<image>.json      c, bf, af, prompts         segments/<image>.png     0 outside F, 1..K (marker, last)

and ``evaluate`` matches segments to the GT masks and writes scores.jsonl and metrics.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from os.path import abspath
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.personal import ReferDataset, SceneImage, Triplet
from ..distributed import Distributed
from ..errors import InputError
from ..evaluation.referring import NO_SEGMENT, ReferringMetric, gt_segments, iou
from ..io import read_image, write_index_png, write_json, write_text
from ..runs import RunOptions, RunSummary, run
from ..runs.manifest import model_identity
from ..runs.method import Evaluation
from ..runs.records import file_digest, marker_path
from .concept import Concept
from .refer import Query, Referrer

FOLDERS = ("segments", "masks", "masks_bf", "scores")
MARKER = "segments/{id}.png"
MEANINGLESS = "the model has random weights (test model): these masks and metrics are MEANINGLESS"


@dataclass(frozen=True)
class SceneItem:
    id: str                         # the image id
    image: SceneImage
    triplets: tuple[Triplet, ...]   # of the split, in dataset order


@dataclass
class Prepared:
    key: str
    rgb: np.ndarray
    class_name: str
    segments: int                   # K = the photo's items
    triplets: tuple[Triplet, ...]
    queries: tuple[Query, ...]


@dataclass(frozen=True)
class SceneOutput:
    """What a writer process needs (numpy only)."""

    key: str
    class_name: str
    segments: np.ndarray            # (H, W) uint8
    triplets: tuple[str, ...]
    prompts: tuple[str, ...]
    correlation: np.ndarray         # (Q, K)
    bf: np.ndarray
    af: np.ndarray


def write_scene(o: SceneOutput, out: Path) -> str:
    for i, tid in enumerate(o.triplets):
        write_index_png(out / "masks" / f"{tid}.png", (o.segments == o.af[i]).astype(np.uint8))
        write_index_png(out / "masks_bf" / f"{tid}.png", (o.segments == o.bf[i]).astype(np.uint8))
    write_json(out / "scores" / f"{o.key}.json", {
        "image": o.key, "class": o.class_name, "segments": int(o.correlation.shape[1]),
        "triplets": [{"id": tid, "prompt": p, "c": [round(float(x), 6) for x in c], "bf": int(b), "af": int(a)}
                     for tid, p, c, b, a in zip(o.triplets, o.prompts, o.correlation, o.bf, o.af)]})
    write_index_png(out / "segments" / f"{o.key}.png", o.segments)   # the marker: last
    return o.key


def scene_items(dataset: ReferDataset, split: str) -> list[SceneItem]:
    """The split's photos, each with its triplets (photos in dataset order)."""
    by_image: dict[str, list[Triplet]] = {}
    for t in dataset.split(split):
        by_image.setdefault(t.image, []).append(t)
    return [SceneItem(i, dataset.images[i], tuple(ts)) for i, ts in by_image.items()]


def load_concepts(folder: Path, ids, referrer: Referrer) -> dict[str, Concept]:
    """Every concept the run needs, loaded and checked against the model before any work."""
    concepts = {}
    for cid in sorted(set(ids)):
        c = Concept.load(Path(folder) / cid)
        c.check(referrer.sd)
        concepts[cid] = c
    return concepts


class ReferMethod:
    """The ``text2mask.runs.Method`` of personalized referring segmentation."""

    name = "refer"
    unit = "image"
    folders = all_folders = FOLDERS
    marker = MARKER
    finish_stage = "write"

    def __init__(self, referrer: Referrer, dataset: ReferDataset, split: str, concepts: dict[str, Concept], log=print):
        self.referrer, self.dataset, self.split, self.concepts, self.log = referrer, dataset, split, concepts, log

    def fingerprint(self) -> dict:
        return {"model": model_identity(self.referrer.sd.info), "method": self.referrer.describe(),
                "split": self.split}

    def describe(self) -> dict:
        return {"seed": self.referrer.config.seed, "model": self.referrer.sd.info,
                "dataset": {"root": abspath(self.dataset.root), "split": self.split,
                            "triplets": len(self.dataset.split(self.split))},
                "concepts": {cid: {"source": c.source, "sha256": c.digest} for cid, c in self.concepts.items()}}

    def inputs(self, item: SceneItem) -> dict:
        return {"photo_sha256": file_digest(item.image.path, "image file"), "class": item.image.class_name,
                "segments": len(item.image.instances),
                "triplets": [{"id": t.id, "text": t.text, "target": t.target, "concept": t.concept,
                              "concept_sha256": self.concepts[t.concept].digest} for t in item.triplets]}

    def prepare(self, item: SceneItem, inputs: dict) -> Prepared:
        queries = tuple(Query(self.concepts[t.concept], t.text) for t in item.triplets)
        return Prepared(item.id, read_image(item.image.path), item.image.class_name,
                        len(item.image.instances), item.triplets, queries)

    def batch_key(self, p: Prepared):
        return p.key            # one photo per model step: its passes are already batched by concept

    def call_cost(self, p: Prepared) -> int:
        return 0

    def model_step(self, batch: list[Prepared]):
        return [self.referrer.refer(p.key, p.rgb, p.queries, p.class_name, p.segments) for p in batch]

    def finish(self, p: Prepared, r):
        return partial(write_scene, SceneOutput(p.key, p.class_name, r.segments, tuple(t.id for t in p.triplets),
                                                tuple(r.prompts), r.correlation, r.bf, r.af))

    def tags(self, p: Prepared):
        return ()

    def evaluate(self, out: Path, items: list[SceneItem], log) -> Evaluation:
        """bf/af accuracy and mIoU of the complete photos' triplets; scores.jsonl."""
        metric, lines, errors = ReferringMetric(), [], []
        for item in items:
            if not marker_path(out, MARKER, item.id).is_file():
                continue
            try:
                lines += self._score_scene(out, item, metric)
            except InputError as e:
                errors.append((item.id, str(e)))
        if not lines:
            return Evaluation(None, errors=errors)
        write_text(out / "scores.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
        metrics = {"split": self.split, "photos": len({x["image"] for x in lines}), **metric.compute()}
        if self.referrer.sd.info.get("random_weights"):
            metrics["warning"] = MEANINGLESS
        for name, m in metric.compute().items():
            log(f"{name}: mIoU {m['mIoU']:.1f}  bf_acc {m['bf_acc']:.1f}  af_acc {m['af_acc']:.1f}  "
                f"(mIoU of bf masks {m['mIoU_bf']:.1f}; {m['triplets']} triplets)")
        return Evaluation(metrics, errors=errors)

    def _score_scene(self, out: Path, item: SceneItem, metric: ReferringMetric) -> list[dict]:
        segments = np.asarray(Image.open(out / "segments" / f"{item.id}.png"))
        scores = json.loads((out / "scores" / f"{item.id}.json").read_text(encoding="utf-8"))
        k = scores["segments"]
        names = list(item.image.instances)
        gts = [_gt_mask(item.image.instances[n], segments.shape) for n in names]
        matched = dict(zip(names, gt_segments(gts, segments, k).tolist()))
        lines = []
        for t, s in zip(item.triplets, scores["triplets"]):
            gt = matched[t.target]
            gt_mask = gts[names.index(t.target)]
            i_af, i_bf = iou(segments == s["af"], gt_mask), iou(segments == s["bf"], gt_mask)
            splits = [self.split] + ([f"{self.split}/{tag}" for tag in t.tags] if self.split == "all" else [])
            metric.add(splits, bf=s["bf"] - 1, af=s["af"] - 1, gt=gt, iou_af=i_af, iou_bf=i_bf)
            lines.append({"id": t.id, "image": item.id, "target": t.target, "concept": t.concept, "text": t.text,
                          "prompt": s["prompt"], "tags": list(t.tags), "c": s["c"], "bf": s["bf"], "af": s["af"],
                          "gt": None if gt == NO_SEGMENT else gt + 1, "iou_af": i_af, "iou_bf": i_bf})
        return lines


def _gt_mask(path: Path, shape) -> np.ndarray:
    try:
        with Image.open(path) as im:
            mask = np.asarray(im.convert("L")) != 0
    except Exception as e:  # PIL raises several types for a bad file
        raise InputError(f"{path}: cannot read mask ({type(e).__name__}: {e})") from None
    if mask.shape != tuple(shape):
        raise InputError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, the photo {shape[1]}x{shape[0]}")
    if not mask.any():
        raise InputError(f"{path}: mask is empty")
    return mask


def refer_dataset(referrer: Referrer, dataset: ReferDataset, split: str, concepts_dir: Path, opts: RunOptions,
                  log=print, dist: Distributed | None = None) -> RunSummary:
    """Segments, masks and scores of ``split`` into ``opts.out`` (see ``text2mask.runs.run``)."""
    dist = dist or Distributed.from_env()
    items = scene_items(dataset, split)
    if not items:
        raise InputError(f"{dataset.root}: split {split!r} has no triplets")
    concepts = load_concepts(concepts_dir, [t.concept for i in items for t in i.triplets], referrer)
    method = ReferMethod(referrer, dataset, split, concepts, log if dist.main else (lambda m: None))
    if dist.main and referrer.sd.info.get("random_weights"):
        log(f"WARNING: {MEANINGLESS}")
    return run(method, items, opts, log=log, dist=dist)
