"""Evaluation protocol: mIoU of predicted masks against ground-truth index PNGs, in
mmsegmentation's vocabulary (``IoUMetric``: ``process`` per sample, then
``compute_metrics``; keys ``aAcc``, ``mIoU``, ``mAcc``, per class ``IoU`` and ``Acc``;
values in percent).

One confusion matrix is accumulated over all images (not a mean of per-image scores);
ground-truth 255 ("void") pixels are ignored. Predictions may use 255 for "unsure"
(training masks); those pixels get their own matrix column: they count as a miss for
their GT class (as in mmseg, whose histograms drop out-of-range predictions), and the
same matrix also yields the coverage and the scores on confident pixels.

With T_c the pixels of class c in both GT and prediction, G_c the GT pixels of class c,
P_c the pixels predicted c (valid GT only):

    IoU_c = T_c / (G_c + P_c - T_c)     Acc_c = T_c / G_c     aAcc = sum_c T_c / sum_c G_c
    mIoU, mAcc = mean over the classes PRESENT in the GT of the evaluated set (G_c > 0)

mmseg averages with ``nanmean`` instead, over the classes whose value is not 0/0. For
mAcc the two rules are the same (Acc_c is 0/0 exactly when G_c = 0). For mIoU they are
the same unless a class absent from the GT is predicted somewhere (P_c > 0, G_c = 0):
mmseg then counts that class with IoU 0, we leave it out (its false positives still lower
the IoU of the classes whose pixels it took). The WSSS papers, ours included, use the
present-class rule.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..classes import IGNORE_INDEX as IGNORE
from ..errors import InputError
from ..io import read_index_png
from ..log import progress as progress_bar


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


def _iou_acc(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class IoU and Acc as fractions (NaN where the class has no GT pixels) and the
    mask of GT-present classes. Pixels in an extra last column count towards the GT row only."""
    n = conf.shape[0]
    tp = np.diag(conf[:, :n]).astype(np.float64)
    gt_c = conf.sum(axis=1)
    pred_c = conf[:, :n].sum(axis=0)
    present = gt_c > 0
    iou, acc = np.full(n, np.nan), np.full(n, np.nan)
    iou[present] = tp[present] / (gt_c + pred_c - tp)[present]
    acc[present] = tp[present] / gt_c[present]
    return iou, acc, present


def _pct_mean(values: np.ndarray, present: np.ndarray) -> float | None:
    return float(100 * values[present].mean()) if present.any() else None


def _pct_or_none(value: float, present: bool) -> float | None:
    return float(100 * value) if present else None


def scores(conf: np.ndarray, class_names: list[str] | None = None) -> dict:
    """Metrics in percent from a matrix made by ``confusion`` (module docstring):
    ``aAcc``, ``mIoU``, ``mAcc``, ``classes_in_mean``, ``per_class`` (``index``, ``name``,
    ``IoU``, ``Acc`` — None for a class absent from the GT —, ``gt_pixels``,
    ``pred_pixels``) and ``confusion`` (the raw matrix as nested lists: rows GT class,
    columns predicted class, last column predicted 255).

    With predicted-255 pixels also: ``coverage`` (share of valid GT pixels with a
    confident prediction), ``mIoU_confident`` and ``aAcc_confident`` (255 predictions
    dropped; a class left without confident GT pixels drops out of that mean).
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
    iou, acc, present = _iou_acc(conf)
    tp = np.diag(conf[:, :n])
    gt_c = conf.sum(axis=1)
    pred_c = conf[:, :n].sum(axis=0)
    result = {
        "aAcc": float(100 * tp.sum() / total),
        "mIoU": _pct_mean(iou, present),
        "mAcc": _pct_mean(acc, present),
        "classes_in_mean": int(present.sum()),
        "per_class": [
            {
                "index": c,
                "name": class_names[c] if class_names is not None else str(c),
                "IoU": _pct_or_none(iou[c], present[c]),
                "Acc": _pct_or_none(acc[c], present[c]),
                "gt_pixels": int(gt_c[c]),
                "pred_pixels": int(pred_c[c]),
            }
            for c in range(n)
        ],
    }
    unsure = int(conf[:, n].sum())
    if unsure:
        confident = conf[:, :n]
        confident_total = total - unsure
        result["coverage"] = 100 * confident_total / total
        c_iou, _, c_present = _iou_acc(confident)
        result["mIoU_confident"] = _pct_mean(c_iou, c_present)
        result["aAcc_confident"] = float(100 * tp.sum() / confident_total) if confident_total else None
    result["confusion"] = conf.tolist()
    return result


class SemanticMetric:
    """Accumulate-then-compute, in the style of mmseg's ``IoUMetric``::

        metric = SemanticMetric(21, class_names)
        for gt, pred in pairs:
            metric.process(gt, pred)        # (H, W) index arrays, 255 = void / unsure
        result = metric.compute_metrics()   # ``scores`` of the summed matrix + ``images``
    """

    def __init__(self, num_classes: int, class_names: list[str] | None = None):
        if not 1 <= num_classes <= IGNORE:
            raise ValueError(f"num_classes must lie in 1..{IGNORE}, got {num_classes}")
        self.num_classes = num_classes
        self.class_names = class_names
        self.confusion = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
        self.images = 0

    def process(self, gt: np.ndarray, pred: np.ndarray) -> None:
        self.confusion += confusion(gt, pred, self.num_classes)
        self.images += 1

    def compute_metrics(self) -> dict:
        return {**scores(self.confusion, self.class_names), "images": self.images}


def _png_stems(folder: Path) -> set[str]:
    return {name[:-4] for name in os.listdir(folder) if name.endswith(".png")}


def evaluate_dirs(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    ids: list[str] | None = None,
    num_classes: int = 21,
    class_names: list[str] | None = None,
    progress: bool = False,
    strict: bool = False,
) -> dict:
    """Scores of ``<pred_dir>/<id>.png`` against ``<gt_dir>/<id>.png`` over all ids
    (default: every PNG in pred_dir, sorted), plus ``images`` (the number evaluated) and
    ``gt_without_prediction`` (GT PNGs in gt_dir with no prediction; ``strict`` makes
    any of them an error, as a listed id without a prediction always is)."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for what, folder in (("prediction", pred_dir), ("ground-truth", gt_dir)):
        if not folder.is_dir():
            raise InputError(f"{folder}: {what} folder not found")
    preds, gts = _png_stems(pred_dir), _png_stems(gt_dir)
    if ids is None:
        ids = sorted(preds)
    if not ids:
        raise InputError(f"{pred_dir}: no predictions to evaluate")
    no_pred = [i for i in ids if i not in preds]
    if no_pred:
        raise InputError(f"{pred_dir / (no_pred[0] + '.png')}: no prediction for id {no_pred[0]!r}"
                         + (f" ({len(no_pred)} listed ids have none)" if len(no_pred) > 1 else ""))
    no_gt = [i for i in ids if i not in gts]
    if no_gt:
        raise InputError(f"{gt_dir / (no_gt[0] + '.png')}: no ground truth for id {no_gt[0]!r}"
                         + (f" ({len(no_gt)} predictions have none)" if len(no_gt) > 1 else ""))
    unscored = sorted(gts - preds)
    if strict and unscored:
        raise InputError(f"{gt_dir}: {len(unscored)} ground-truth image(s) have no prediction in {pred_dir} "
                         f"(first: {unscored[0]}); --strict requires one for each")
    metric = SemanticMetric(num_classes, class_names)
    for id_ in progress_bar(ids, enabled=progress, desc="evaluate", unit="img"):
        pred_path, gt_path = pred_dir / f"{id_}.png", gt_dir / f"{id_}.png"
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
        metric.process(gt, pred)
    if not metric.confusion.any():
        raise InputError(f"{gt_dir}: the ground truth of the {len(ids)} evaluated image(s) is all void (255)")
    return {**metric.compute_metrics(), "gt_without_prediction": len(unscored)}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def format_table(result: dict, title: str) -> str:
    """Per-class IoU and Acc table in percent ('-' for classes absent from GT), then the
    summary. Past 21 classes (COCO's 81) the absent ones are counted, not listed."""
    rows = result["per_class"]
    hidden = 0
    if len(rows) > 21:
        hidden = sum(c["IoU"] is None for c in rows)
        rows = [c for c in rows if c["IoU"] is not None]
    width = max([len("class")] + [len(c["name"]) for c in rows])
    lines = [title, f"{'idx':>3}  {'class':<{width}}  {'IoU %':>6}  {'Acc %':>6}"]
    lines += [f"{c['index']:>3}  {c['name']:<{width}}  {_pct(c['IoU']):>6}  {_pct(c['Acc']):>6}" for c in rows]
    if hidden:
        lines.append(f"({hidden} classes absent from the ground truth not listed)")
    lines.append(f"mIoU: {_pct(result['mIoU'])}% over {result['classes_in_mean']} classes")
    lines.append(f"mAcc: {_pct(result['mAcc'])}%")
    lines.append(f"aAcc (pixel accuracy): {_pct(result['aAcc'])}%")
    if "images" in result:
        lines.append(f"images: {result['images']}")
    if result.get("gt_without_prediction"):
        lines.append(f"ground-truth images without a prediction (not scored): {result['gt_without_prediction']}")
    if "coverage" in result:
        lines.append(f"coverage (prediction not 255): {_pct(result['coverage'])}%")
        lines.append(f"mIoU on confident pixels: {_pct(result['mIoU_confident'])}%")
        lines.append(f"aAcc on confident pixels: {_pct(result['aAcc_confident'])}%")
    return "\n".join(lines)
