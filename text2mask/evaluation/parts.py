"""Part segmentation scores (SLiMe): the official per-image protocol and our confusion form.

Official protocol (SLiMe ``test_step``): for every image and every class c present in
that image's ground truth (background included), IoU_c = |P_c & G_c| / |P_c | G_c|; a
class's score is the mean of its IoUs over the images that contain it, and the mIoU is
the mean over the classes seen in at least one image. False positives on an image that
lacks the class never count. The confusion form (``semantic``) accumulates one matrix
over all pixels, so those false positives do count: the two numbers differ.

Ground truth: ``.npy`` or index ``.png`` masks; 255 (void) is ignored by both. Keys and
units follow ``semantic`` (mmseg's vocabulary, percent).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..classes import IGNORE_INDEX as IGNORE
from ..errors import InputError
from ..io import read_index_png
from .semantic import SemanticMetric
OFFICIAL_SIZE = 512   # the official code scores 512 x 512 squashed masks

# Class lists of the SLiMe benchmarks, index order (spec section 5).
PART_CLASSES = {
    "car": ("background", "body", "light", "plate", "wheel", "window"),
    "horse": ("background", "head", "neck+torso", "leg", "tail"),
    "celeba": ("background", "skin", "eye", "mouth", "nose", "brow", "ear", "neck", "cloth", "hair"),
}


def image_ious(gt: np.ndarray, pred: np.ndarray, classes: int) -> dict[int, float]:
    """{class: IoU} for the classes present in this image's ground truth (void ignored)."""
    valid = gt != IGNORE
    out = {}
    for c in np.unique(gt[valid]).tolist():
        g, p = (gt == c) & valid, (pred == c) & valid
        out[int(c)] = float((g & p).sum() / (g | p).sum())
    return out


class PartsMetric:
    """Accumulate-then-compute, like ``semantic.SemanticMetric``::

        metric = PartsMetric(class_names)
        for gt, pred in pairs:
            metric.process(gt, pred)
        result = metric.compute_metrics()   # {"official": ..., "confusion": ..., "images": n}
    """

    def __init__(self, class_names: Sequence[str]):
        self.names = list(class_names)
        self.iou_sum = np.zeros(len(self.names))
        self.images_with = np.zeros(len(self.names), dtype=np.int64)
        self.semantic = SemanticMetric(len(self.names), self.names)

    def process(self, gt: np.ndarray, pred: np.ndarray) -> dict[int, float]:
        """Score one image (same shape, values 0..K-1 or 255); returns its per-class IoUs
        as fractions."""
        self.semantic.process(gt, pred)   # checks the shapes and the values first
        ious = image_ious(gt, pred, len(self.names))
        for c, v in ious.items():
            self.iou_sum[c] += v
            self.images_with[c] += 1
        return ious

    def compute_metrics(self) -> dict:
        """``official``: the per-image protocol (``mIoU``, ``per_class`` with ``IoU`` and
        ``images``, percent); ``confusion``: ``semantic.scores`` of the pooled matrix."""
        if not self.semantic.images:
            raise ValueError("no images to score")
        seen = self.images_with > 0
        per_class = np.where(seen, 100 * self.iou_sum / np.maximum(self.images_with, 1), np.nan)
        official = {
            "mIoU": float(per_class[seen].mean()),
            "per_class": [{"index": c, "name": n, "IoU": float(per_class[c]) if seen[c] else None,
                           "images": int(self.images_with[c])} for c, n in enumerate(self.names)],
            "classes_in_mean": int(seen.sum()),
        }
        conf = self.semantic.compute_metrics()
        return {"official": official, "confusion": conf, "images": conf.pop("images")}


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """An index mask from ``.npy`` (integer-valued, any numeric dtype) or an index PNG."""
    path = Path(path)
    if path.suffix.lower() != ".npy":
        return read_index_png(path)
    try:
        a = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises several types for a bad file
        raise InputError(f"{path}: cannot read mask ({type(e).__name__}: {e})") from e
    if a.ndim != 2:
        raise InputError(f"{path}: mask must be 2-D, got shape {a.shape}")
    if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)) or a.min() < 0 or a.max() > 255:
        raise InputError(f"{path}: mask values must be integers in 0..255")
    return a.astype(np.uint8)


def find_mask(folder: Path, stem: str) -> Path:
    for suffix in (".npy", ".png"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    raise InputError(f"{folder}: no ground truth {stem}.npy or {stem}.png")


def squash(mask: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))


def evaluate_dirs(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, class_names: Sequence[str],
                  official_size: bool = False) -> dict:
    """Score ``<pred_dir>/<id>.png`` against ``<gt_dir>/<id>.npy|png`` for every predicted
    id. ``official_size``: squash both to 512 x 512 (nearest) first, as the official code
    scores; otherwise at the ground truth's size (the prediction must match it)."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if not pred_dir.is_dir():
        raise InputError(f"{pred_dir}: prediction folder not found")
    ids = sorted(p.stem for p in pred_dir.glob("*.png"))
    if not ids:
        raise InputError(f"{pred_dir}: no predictions to evaluate")
    metric = PartsMetric(class_names)
    k = len(class_names)
    for id_ in ids:
        gt_path = find_mask(gt_dir, id_)
        pred, gt = read_index_png(pred_dir / f"{id_}.png"), read_mask(gt_path)
        if official_size:
            pred, gt = squash(pred, OFFICIAL_SIZE), squash(gt, OFFICIAL_SIZE)
        if pred.shape != gt.shape:
            raise InputError(f"size mismatch for id {id_!r}: prediction is {pred.shape[1]}x{pred.shape[0]}, "
                             f"ground truth {gt_path} is {gt.shape[1]}x{gt.shape[0]}")
        for path, a in ((pred_dir / f"{id_}.png", pred), (gt_path, gt)):
            bad = np.unique(a[(a >= k) & (a != IGNORE)]).tolist()
            if bad:
                raise InputError(f"{path}: values {bad} are neither a class index 0..{k - 1} nor {IGNORE}")
        metric.process(gt, pred)
    return metric.compute_metrics()


def format_table(result: dict, title: str) -> str:
    """Both protocols side by side, in percent."""
    pct = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    off, conf = result["official"], result["confusion"]
    width = max(len("class"), *(len(c["name"]) for c in off["per_class"]))
    lines = [title, f"{'idx':>3}  {'class':<{width}}  {'per-image %':>11}  {'confusion %':>11}  {'images':>6}"]
    for o, c in zip(off["per_class"], conf["per_class"]):
        lines.append(f"{o['index']:>3}  {o['name']:<{width}}  {pct(o['IoU']):>11}  {pct(c['IoU']):>11}  {o['images']:>6}")
    lines.append(f"mIoU (official per-image protocol, background included): {pct(off['mIoU'])}%")
    lines.append(f"mIoU (one confusion matrix over all pixels): {pct(conf['mIoU'])}%")
    lines.append(f"images: {result['images']}")
    return "\n".join(lines)
