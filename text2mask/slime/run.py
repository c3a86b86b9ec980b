"""Batch segmentation of many photos with fitted parts (``text2mask slime segment``):
SLiMe plugged into the shared batch engine (``text2mask.runs``).

Per photo: read it and put it on the canvas (``prepare``), one UNet call per batch over
every tile of every photo (``model_step``: scores, then labels at the photo's size), PNGs
in a writer process (``finish``):

    overlays/<id>.png   the labels blended into the photo
    pictures/<id>.png   photo | WAS map per class | labels (with ``pictures``)
    masks/<id>.png      mode-L index PNG, values 0..K-1; written LAST (completion marker)

The engine brings resume, the input records, the failure log, shards, the lock and
run.json. With ground truth (``gt_dir``), both part protocols go to metrics.json.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from os.path import abspath
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import ConfigError, InputError
from ..guard import safe_name
from ..io import image_files, read_image, write_index_png, write_png
from ..runs import RunOptions, RunSummary, run
from ..runs.manifest import model_identity
from ..runs.method import Evaluation
from ..runs.records import file_digest, marker_path
from ..visualize import overlay
from .pictures import was_strip
from .predictor import Slime, SlimeResult

MARKER = "masks/{id}.png"
FOLDERS = ("overlays", "pictures", "masks")
_FLOAT32 = 4


@dataclass(frozen=True)
class Photo:
    id: str
    image: Path


def photos(paths: Sequence[str | Path]) -> list[Photo]:
    """Photos from files and folders (a folder: its images, sorted); ids are file stems."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += image_files(p)
        elif p.is_file():
            found.append(p)
        else:
            raise InputError(f"{p}: no such image file or folder")
    if not found:
        raise InputError(f"no images in {', '.join(map(str, paths))}")
    seen: dict[str, Path] = {}
    for f in found:
        safe_name(f.stem, f"photo id of {f}")   # it names masks/<id>.png and the other outputs
        if f.stem in seen:
            raise InputError(f"{f} and {seen[f.stem]} share the id {f.stem!r}: their masks would collide")
        seen[f.stem] = f
    return [Photo(f.stem, f) for f in found]


@dataclass
class Prepared:
    key: str
    rgb: np.ndarray


def write_outputs(key: str, rgb: np.ndarray, result: SlimeResult, folders: tuple[str, ...], out: Path) -> None:
    """Module level: pickled to a writer process. The mask (the marker) goes last."""
    if "overlays" in folders:
        write_png(Path(out) / "overlays" / f"{key}.png", Image.fromarray(overlay(rgb, result.labels)))
    if "pictures" in folders:
        write_png(Path(out) / "pictures" / f"{key}.png",
                  was_strip(rgb, result.scores, result.valid, result.labels, result.classes))
    write_index_png(Path(out) / "masks" / f"{key}.png", result.labels)


class SlimeMethod:
    """The ``text2mask.runs.Method`` of SLiMe segmentation."""

    name = "slime"
    unit = "image"
    all_folders = FOLDERS
    marker = MARKER
    finish_stage = "write"

    def __init__(self, slime: Slime, parts_path: Path, overlays: bool = True, pictures: bool = False,
                 gt_dir: Path | None = None, log=print):
        self.slime, self.parts_path, self.gt_dir, self.log = slime, parts_path, gt_dir, log
        self.folders = tuple(f for f, on in zip(FOLDERS, (overlays, pictures, True)) if on)

    def fingerprint(self) -> dict:
        return {"model": model_identity(self.slime.sd.info),
                "parts_sha256": file_digest(self.parts_path, "parts file"),
                "segment": asdict(self.slime.settings), "seed": self.slime.seed, "folders": list(self.folders)}

    def describe(self) -> dict:
        # not "parts": run.json uses that key for the shards of a sharded run
        return {"model": self.slime.sd.info, "parts_file": {"path": abspath(self.parts_path), **self.slime.describe()}}

    def inputs(self, photo: Photo) -> dict:
        return {"photo_sha256": file_digest(photo.image, "image file")}

    def prepare(self, photo: Photo, inputs: dict) -> Prepared:
        return Prepared(photo.id, read_image(photo.image))

    def batch_key(self, p: Prepared):
        return None   # every photo goes onto the same canvas

    def call_cost(self, p: Prepared) -> int:
        """The self-attention probabilities of the largest hooked block dominate: per
        tile heads x N^2 fp32 logits and probabilities."""
        s = self.slime.settings
        n = (s.canvas // 8) ** 2
        heads = self.slime.sd.unet.get_submodule("up_blocks.3.attentions.0").transformer_blocks[0].attn1.heads
        return s.tiles ** 2 * 2 * heads * n * n * _FLOAT32

    def model_step(self, batch: list[Prepared]) -> list[SlimeResult]:
        return self.slime.segment([(p.key, p.rgb) for p in batch])

    def finish(self, p: Prepared, result: SlimeResult):
        return partial(write_outputs, p.key, p.rgb, result, self.folders)

    def tags(self, p: Prepared):
        return ()

    def evaluate(self, out: Path, items: Sequence[Photo], log) -> Evaluation:
        """Both part protocols over the complete photos that have a ground truth."""
        if self.gt_dir is None:
            return Evaluation(None)
        from ..evaluation.parts import PartsMetric, find_mask, format_table, read_mask
        from ..io import read_index_png

        metric, no_gt, errors = PartsMetric(self.slime.classes), [], []
        for photo in items:
            pred_path = marker_path(out, MARKER, photo.id)
            if not pred_path.is_file():
                continue
            try:
                gt_path = find_mask(self.gt_dir, photo.id)
            except InputError:
                no_gt.append(photo.id)
                continue
            try:
                metric.process(read_mask(gt_path), read_index_png(pred_path))
            except (ConfigError, ValueError) as e:
                errors.append((photo.id, f"{gt_path}: {e}"))
        if not metric.semantic.images:
            return Evaluation(None, no_gt, errors)
        result = metric.compute_metrics()
        log(format_table(result, f"masks/ vs {self.gt_dir}"))
        return Evaluation(result, no_gt, errors)


def segment_photos(slime: Slime, parts_path: Path, items: Sequence[Photo], opts: RunOptions,
                   overlays: bool = True, pictures: bool = False, gt_dir: Path | None = None,
                   log=print) -> RunSummary:
    if slime.sd.info.get("random_weights"):
        log("WARNING: the model has random weights (test model): these masks are MEANINGLESS")
    return run(SlimeMethod(slime, parts_path, overlays, pictures, gt_dir, log), items, opts, log=log)
