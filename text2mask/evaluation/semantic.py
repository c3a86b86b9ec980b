"""Evaluation protocol: mIoU of predicted masks against ground-truth index PNGs.

One confusion matrix is accumulated over all images (not a mean of per-image scores),
ground-truth 255 ("void") pixels are ignored, and a class absent from the ground truth
of the whole evaluated set is left out of the mean. Predictions may use 255 for
"ignore / unsure" (training masks); those pixels get their own matrix column so the
same matrix yields the strict mIoU, the coverage and the mIoU on confident pixels.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..io import read_index_png
from ..errors import InputError

IGNORE = 255

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
]


def _invalid_values(a: np.ndarray, num_classes: int) -> list[int]:
    return np.unique(a[((a < 0) | (a >= num_classes)) & (a != IGNORE)]).tolist()


def confusion(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 matrix (num_classes, num_classes + 1): rows GT class, columns predicted
    class, last column predicted 255. GT 255 pixels are skipped."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth shape {gt.shape} differs from prediction shape {pred.shape}")
    for what, a in (("ground truth", gt), ("prediction", pred)):
        bad = _invalid_values(a, num_classes)
        if bad:
            raise ValueError(f"{what} has values {bad} outside 0..{num_classes - 1} and {IGNORE}")
    valid = gt != IGNORE
    g = gt[valid].astype(np.int64)  # int64 before multiplying: uint8 would overflow
    p = pred[valid].astype(np.int64)
    p[p == IGNORE] = num_classes
    cols = num_classes + 1
    return np.bincount(g * cols + p, minlength=num_classes * cols).reshape(num_classes, cols)


def _iou(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class IoU (NaN where the class has no GT pixels) and the mask of GT-present
    classes. Pixels in an extra last column count towards the GT row only."""
    n = conf.shape[0]
    tp = np.diag(conf[:, :n]).astype(np.float64)
    gt_c = conf.sum(axis=1)
    pred_c = conf[:, :n].sum(axis=0)
    present = gt_c > 0
    iou = np.full(n, np.nan)
    iou[present] = tp[present] / (gt_c + pred_c - tp)[present]
    return iou, present


def _mean_present(iou: np.ndarray, present: np.ndarray) -> float | None:
    return float(iou[present].mean()) if present.any() else None


def scores(conf: np.ndarray, class_names: list[str] | None = None) -> dict:
    """Scores (fractions in [0, 1]) from a matrix made by `confusion`.

    With predicted-255 pixels also: `coverage` (share of valid GT pixels with a
    confident prediction), `miou_confident` and `pixel_accuracy_confident` (255
    predictions dropped; a class left without confident GT pixels drops out of that mean).
    """
    conf = np.asarray(conf, dtype=np.int64)
    n = conf.shape[0]
    if conf.shape != (n, n + 1):
        raise ValueError(f"confusion matrix must have shape (n, n + 1), got {conf.shape}")
    if class_names is not None and len(class_names) != n:
        raise ValueError(f"{len(class_names)} class names for {n} classes")
    total = int(conf.sum())
    if total == 0:
        raise ValueError("no valid ground-truth pixels to evaluate")
    iou, present = _iou(conf)
    tp = np.diag(conf[:, :n])
    gt_c = conf.sum(axis=1)
    pred_c = conf[:, :n].sum(axis=0)
    result = {
        "miou": _mean_present(iou, present),
        "pixel_accuracy": float(tp.sum() / total),
        "per_class": [
            {
                "index": c,
                "name": class_names[c] if class_names is not None else str(c),
                "iou": float(iou[c]) if present[c] else None,
                "gt_pixels": int(gt_c[c]),
                "pred_pixels": int(pred_c[c]),
            }
            for c in range(n)
        ],
        "classes_in_mean": int(present.sum()),
    }
    unsure = int(conf[:, n].sum())
    if unsure:
        confident = conf[:, :n]
        confident_total = total - unsure
        result["coverage"] = confident_total / total
        result["miou_confident"] = _mean_present(*_iou(confident))
        result["pixel_accuracy_confident"] = (
            float(tp.sum() / confident_total) if confident_total else None
        )
    return result


def evaluate_dirs(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    ids: list[str] | None = None,
    num_classes: int = 21,
    class_names: list[str] | None = None,
    progress: bool = False,
) -> dict:
    """Scores of `<pred_dir>/<id>.png` against `<gt_dir>/<id>.png` over all ids (default:
    every PNG in pred_dir, sorted), plus `images` (the number of images evaluated)."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if not pred_dir.is_dir():
        raise InputError(f"{pred_dir}: prediction folder not found")
    if ids is None:
        ids = sorted(p.stem for p in pred_dir.glob("*.png"))
    if not ids:
        raise InputError(f"{pred_dir}: no predictions to evaluate")
    conf = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    for id_ in tqdm(ids, desc="evaluate", unit="img", disable=not progress):
        pred_path, gt_path = pred_dir / f"{id_}.png", gt_dir / f"{id_}.png"
        if not pred_path.exists():
            raise InputError(f"{pred_path}: no prediction for id {id_!r}")
        pred, gt = read_index_png(pred_path), read_index_png(gt_path)
        if pred.shape != gt.shape:
            raise InputError(
                f"size mismatch: prediction {pred_path} is {pred.shape[1]}x{pred.shape[0]} (w x h) "
                f"but ground truth {gt_path} is {gt.shape[1]}x{gt.shape[0]}"
            )
        for path, a in ((pred_path, pred), (gt_path, gt)):
            bad = _invalid_values(a, num_classes)
            if bad:
                raise InputError(
                    f"{path}: values {bad} are neither a class index 0..{num_classes - 1} nor {IGNORE}"
                )
        conf += confusion(gt, pred, num_classes)
    return {**scores(conf, class_names), "images": len(ids)}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def format_table(result: dict, title: str) -> str:
    """Per-class IoU table in percent ('-' for classes absent from GT), then the summary.
    Past 21 classes (COCO's 81) the absent ones are counted, not listed."""
    rows = result["per_class"]
    hidden = 0
    if len(rows) > 21:
        hidden = sum(c["iou"] is None for c in rows)
        rows = [c for c in rows if c["iou"] is not None]
    width = max([len("class")] + [len(c["name"]) for c in rows])
    lines = [title, f"{'idx':>3}  {'class':<{width}}  {'IoU %':>6}"]
    lines += [f"{c['index']:>3}  {c['name']:<{width}}  {_pct(c['iou']):>6}" for c in rows]
    if hidden:
        lines.append(f"({hidden} classes absent from the ground truth not listed)")
    lines.append(f"mIoU: {_pct(result['miou'])}% over {result['classes_in_mean']} classes")
    lines.append(f"pixel accuracy: {_pct(result['pixel_accuracy'])}%")
    if "images" in result:
        lines.append(f"images: {result['images']}")
    if "coverage" in result:
        lines.append(f"coverage (prediction not 255): {_pct(result['coverage'])}%")
        lines.append(f"mIoU on confident pixels: {_pct(result['miou_confident'])}%")
        lines.append(
            f"pixel accuracy on confident pixels: {_pct(result['pixel_accuracy_confident'])}%"
        )
    return "\n".join(lines)
