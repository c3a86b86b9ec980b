"""Dataset run of personalized referring segmentation (``text2mask refer --data-root``),
plugged into the shared batch engine (``text2mask.runs``).

An item is a scene photo with its triplets in the split. The af of a triplet is the
Hungarian assignment over its *af group* (``--af-group``):

    photo  (default, the paper's "all the items contained in the scene together"): the
           triplet and, for every other item of the photo, one triplet of that item from
           anywhere in the dataset (its own concept's, concept == target, first in dataset
           order; else the first naming it), whatever split is scored
    split  the photo's triplets within the scored split, jointly (a photo with one scored
           triplet then has af = bf by construction)

Every triplet of a group is queried (one pass each), so ``photo`` may add passes for
triplets outside the split. ``prepare`` reads the photo, ``model_step`` runs the
``Referrer``, ``finish`` writes

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
from ..data.personal import ReferDataset, SceneImage, Triplet
from ..distributed import Distributed
from ..errors import ConfigError, InputError
from ..evaluation.referring import NO_SEGMENT, ReferringMetric, gt_segments, iou
from ..guard import safe_name
from ..io import read_binary_mask, read_image, read_index_png, write_index_png, write_json, write_text
from ..runs import RunOptions, RunSummary, run
from ..runs.manifest import model_identity
from ..runs.method import Evaluation
from ..runs.records import file_digest, marker_path
from .assign import assign_groups
from .concept import Concept
from .refer import Query, Referrer

FOLDERS = ("segments", "masks", "masks_bf", "scores")
MARKER = "segments/{id}.png"
MEANINGLESS = "the model has random weights (test model): these masks and metrics are MEANINGLESS"
AF_GROUPS = ("photo", "split")


@dataclass(frozen=True)
class SceneItem:
    id: str                         # the image id
    image: SceneImage
    triplets: tuple[Triplet, ...]   # scored: of the split, in dataset order
    queries: tuple[Triplet, ...] = ()          # every triplet queried (scored + af companions), dataset order
    rows: tuple[int, ...] = ()                 # per scored triplet, its index in ``queries``
    groups: tuple[tuple[int, ...], ...] = ()   # per scored triplet, its af group (indices into ``queries``)


@dataclass
class Prepared:
    key: str
    rgb: np.ndarray
    class_name: str
    segments: int                   # K = the photo's items
    item: SceneItem
    queries: tuple[Query, ...]      # of item.queries


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
    af_groups: tuple[tuple[str, ...], ...] | None = None   # per triplet, the ids of its af group
    queries: tuple[tuple[str, str, np.ndarray], ...] = ()   # every query: (id, prompt, c row)


def _c(row) -> list[float]:
    return [round(float(x), 6) for x in row]


def write_scene(o: SceneOutput, out: Path) -> str:
    safe_name(o.key, "photo id")
    for tid in o.triplets:
        safe_name(tid, "triplet id")
    for i, tid in enumerate(o.triplets):
        write_index_png(out / "masks" / f"{tid}.png", (o.segments == o.af[i]).astype(np.uint8))
        write_index_png(out / "masks_bf" / f"{tid}.png", (o.segments == o.bf[i]).astype(np.uint8))
    triplets = [{"id": tid, "prompt": p, "c": _c(c), "bf": int(b), "af": int(a)}
                for tid, p, c, b, a in zip(o.triplets, o.prompts, o.correlation, o.bf, o.af)]
    if o.af_groups is not None:
        for t, g in zip(triplets, o.af_groups):
            t["af_group"] = list(g)
    doc = {"image": o.key, "class": o.class_name, "segments": int(o.correlation.shape[1]), "triplets": triplets}
    if o.queries:
        doc["queries"] = [{"id": q, "prompt": p, "c": _c(c)} for q, p, c in o.queries]
    write_json(out / "scores" / f"{o.key}.json", doc)
    write_index_png(out / "segments" / f"{o.key}.png", o.segments)   # the marker: last
    return o.key


def af_group_rows(photo_triplets: list[Triplet], scored: list[Triplet], instances, mode: str
                  ) -> tuple[tuple[Triplet, ...], tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """(queries, row of each scored triplet, af group of each) of one photo; see the module
    docstring. ``photo_triplets``: every triplet of the photo in the dataset, in order."""
    if mode not in AF_GROUPS:
        raise ConfigError(f"--af-group {mode!r}: use photo or split")
    if mode == "split":
        rows = tuple(range(len(scored)))
        return tuple(scored), rows, (rows,) * len(scored)
    representative: dict[str, Triplet] = {}
    for t in photo_triplets:     # its own concept's triplet first, else the first naming it
        r = representative.get(t.target)
        if r is None or (r.concept != r.target and t.concept == t.target):
            representative[t.target] = t
    members = []
    for t in scored:
        others = [representative[i] for i in instances if i != t.target and i in representative]
        members.append([t] + others)
    order = {t.id: n for n, t in enumerate(photo_triplets)}
    queries = tuple(sorted({t.id: t for group in members for t in group}.values(), key=lambda t: order[t.id]))
    index = {t.id: n for n, t in enumerate(queries)}
    rows = tuple(index[t.id] for t in scored)
    return queries, rows, tuple(tuple(sorted(index[t.id] for t in g)) for g in members)


def scene_items(dataset: ReferDataset, split: str, af_group: str = "photo") -> list[SceneItem]:
    """The split's photos (dataset order), each with its scored triplets and af groups."""
    by_image: dict[str, list[Triplet]] = {}
    for t in dataset.split(split):
        by_image.setdefault(t.image, []).append(t)
    everything: dict[str, list[Triplet]] = {}
    for t in dataset.triplets:
        everything.setdefault(t.image, []).append(t)
    items = []
    for i, ts in by_image.items():
        queries, rows, groups = af_group_rows(everything[i], ts, dataset.images[i].instances, af_group)
        items.append(SceneItem(i, dataset.images[i], tuple(ts), queries, rows, groups))
    return items


def load_concepts(folder: Path, ids) -> dict[str, Concept]:
    """Every concept the run needs, ``<folder>/<concept id>``, read and schema-checked
    before the model loads."""
    return {cid: Concept.load(Path(folder) / safe_name(cid, "concept id")) for cid in sorted(set(ids))}


def check_concepts(concepts: dict[str, Concept], referrer: Referrer) -> None:
    """Names, count and shapes of every concept against the loaded model."""
    for c in concepts.values():
        c.check(referrer.sd)


class ReferMethod:
    """The ``text2mask.runs.Method`` of personalized referring segmentation."""

    name = "refer"
    unit = "image"
    folders = all_folders = FOLDERS
    marker = MARKER
    finish_stage = "write"

    def __init__(self, referrer: Referrer, dataset: ReferDataset, split: str, concepts: dict[str, Concept], log=print,
                 af_group: str = "photo"):
        self.referrer, self.dataset, self.split, self.concepts, self.log = referrer, dataset, split, concepts, log
        self.af_group = af_group

    def fingerprint(self) -> dict:
        return {"model": model_identity(self.referrer.sd.info), "method": self.referrer.describe(),
                "split": self.split, "af_group": self.af_group}

    def describe(self) -> dict:
        return {"seed": self.referrer.config.seed, "model": self.referrer.sd.info,
                "af_group": self.af_group,
                "dataset": {"root": abspath(self.dataset.root), "split": self.split,
                            "triplets": len(self.dataset.split(self.split))},
                "concepts": {cid: {"source": c.source, "sha256": c.digest} for cid, c in self.concepts.items()}}

    def inputs(self, item: SceneItem) -> dict:
        return {"photo_sha256": file_digest(item.image.path, "image file"), "class": item.image.class_name,
                "segments": len(item.image.instances),
                "triplets": [t.id for t in item.triplets],
                "queries": [{"id": t.id, "text": t.text, "target": t.target, "concept": t.concept,
                             "concept_sha256": self.concepts[t.concept].digest} for t in item.queries],
                "af_groups": [list(g) for g in item.groups]}

    def prepare(self, item: SceneItem, inputs: dict) -> Prepared:
        queries = tuple(Query(self.concepts[t.concept], t.text) for t in item.queries)
        return Prepared(item.id, read_image(item.image.path), item.image.class_name,
                        len(item.image.instances), item, queries)

    def batch_key(self, p: Prepared):
        return p.key            # one photo per model step: its passes are already batched by concept

    def call_cost(self, p: Prepared) -> int:
        return 0

    def model_step(self, batch: list[Prepared]):
        return [self.referrer.refer(p.key, p.rgb, p.queries, p.class_name, p.segments) for p in batch]

    def finish(self, p: Prepared, r):
        item, rows = p.item, list(p.item.rows)
        af = assign_groups(r.correlation, rows, item.groups) + 1
        ids = [t.id for t in item.queries]
        return partial(write_scene, SceneOutput(
            p.key, p.class_name, r.segments, tuple(t.id for t in item.triplets), tuple(r.prompts[i] for i in rows),
            r.correlation[rows], r.bf[rows], af, tuple(tuple(ids[j] for j in g) for g in item.groups),
            tuple((q, pr, c) for q, pr, c in zip(ids, r.prompts, r.correlation))))

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
        segments = read_index_png(out / "segments" / f"{item.id}.png")
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
    mask = read_binary_mask(path)    # the one binary rule (text2mask.io): alpha, non-zero, bright
    if mask.shape != tuple(shape):
        raise InputError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, the photo {shape[1]}x{shape[0]}")
    if not mask.any():
        raise InputError(f"{path}: mask is empty")
    return mask


def plan(dataset: ReferDataset, split: str, af_group: str = "photo") -> list[SceneItem]:
    """The run's photos (exit 2 when the split is empty)."""
    items = scene_items(dataset, split, af_group)
    if not items:
        raise InputError(f"{dataset.root}: split {split!r} has no triplets")
    return items


def alone_warning(items: list[SceneItem], af_group: str) -> str | None:
    """The warning when some triplets' af equals their bf by construction (a group of one)."""
    alone = [t.id for item in items for t, g in zip(item.triplets, item.groups) if len(g) == 1]
    if not alone:
        return None
    why = "no other item of their photo has a triplet" if af_group == "photo" else \
        "they are the only triplet of their photo in the split (--af-group photo groups all the photo's items)"
    return (f"{len(alone)} of {sum(len(i.triplets) for i in items)} triplet(s) have af = bf by construction: {why} "
            f"({', '.join(alone[:5])}{' ...' if len(alone) > 5 else ''})")


def refer_dataset(referrer: Referrer, dataset: ReferDataset, split: str, concepts: Path | dict[str, Concept],
                  opts: RunOptions, log=print, dist: Distributed | None = None, af_group: str = "photo") -> RunSummary:
    """Segments, masks and scores of ``split`` into ``opts.out`` (see ``text2mask.runs.run``).
    ``concepts``: the folder of trained concepts (one sub-folder per concept id), or them loaded."""
    dist = dist or Distributed.from_env()
    items = plan(dataset, split, af_group)
    if not isinstance(concepts, dict):
        concepts = load_concepts(concepts, [t.concept for i in items for t in i.queries])
    check_concepts(concepts, referrer)
    method = ReferMethod(referrer, dataset, split, concepts, log if dist.main else (lambda m: None), af_group)
    warning = alone_warning(items, af_group)
    if dist.main and warning:
        log(f"WARNING: {warning}")
    if dist.main and referrer.sd.info.get("random_weights"):
        log(f"WARNING: {MEANINGLESS}")
    return run(method, items, opts, log=log, dist=dist)
