"""Referring segmentation scores (personalized segmentation, paper §5.3): accumulate per
triplet, then compute per split.

    GT segment of an item = Hungarian matching of GT mask centroids to predicted segment
                            centroids on Euclidean distance, in image pixels
    bf_acc / af_acc       = share of triplets whose bf / af segment is the item's GT segment
    mIoU                  = mean over triplets of IoU(af mask, GT mask)   (mIoU_bf: bf masks)

All values are reported in percent, as the paper's tables do.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

NO_SEGMENT = -1


def centroid(mask: np.ndarray) -> tuple[float, float] | None:
    """(y, x) mean pixel position of a boolean mask, None when it is empty."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    return float(ys.mean()), float(xs.mean())


def gt_segments(gt_masks: Sequence[np.ndarray], segments: np.ndarray, k: int) -> np.ndarray:
    """Per GT item, its segment 0..K−1 (or NO_SEGMENT when there are more items than
    segments), by a minimum-distance matching of centroids. ``segments`` (H, W) holds
    1..K (0 = outside the object area) at the GT masks' size."""
    gt_c = [centroid(np.asarray(m, dtype=bool)) for m in gt_masks]
    seg_c = [centroid(segments == s + 1) for s in range(k)]
    if any(c is None for c in gt_c):
        raise ValueError("a ground-truth mask is empty")
    far = float(np.hypot(*segments.shape)) * 10  # an empty segment is matched last
    dist = np.array([[far if s is None else np.hypot(g[0] - s[0], g[1] - s[1]) for s in seg_c]
                     for g in gt_c]).reshape(len(gt_c), k)
    rows, cols = linear_sum_assignment(dist)
    out = np.full(len(gt_c), NO_SEGMENT, dtype=np.int64)
    out[rows] = cols
    return out


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shape {pred.shape} differs from ground truth {gt.shape}")
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 1.0


@dataclass
class _Sums:
    triplets: int = 0
    bf_hits: int = 0
    af_hits: int = 0
    iou_af: float = 0.0
    iou_bf: float = 0.0


@dataclass
class ReferringMetric:
    """Accumulates triplet results per split; ``compute`` gives the paper's three numbers
    (plus mIoU of the bf masks) per split, in percent."""

    sums: dict[str, _Sums] = field(default_factory=dict)

    def add(self, splits: Iterable[str], *, bf: int, af: int, gt: int, iou_af: float, iou_bf: float) -> None:
        for split in splits:
            s = self.sums.setdefault(split, _Sums())
            s.triplets += 1
            s.bf_hits += int(gt != NO_SEGMENT and bf == gt)
            s.af_hits += int(gt != NO_SEGMENT and af == gt)
            s.iou_af += iou_af
            s.iou_bf += iou_bf

    def compute(self) -> dict[str, dict]:
        out = {}
        for split, s in self.sums.items():
            n = s.triplets
            out[split] = {"mIoU": 100 * s.iou_af / n, "bf_acc": 100 * s.bf_hits / n,
                          "af_acc": 100 * s.af_hits / n, "mIoU_bf": 100 * s.iou_bf / n, "triplets": n}
        return out
