"""Few-shot segmentation scores as the FSS literature computes them (HSNet's
``common/evaluation.py`` and ``common/logger.py``).

Per episode, on the query, with ignored pixels left out (PASCAL's 255 boundaries):

    I_fg = |P ∩ G|,  U_fg = |P ∪ G|,  I_bg = |¬P ∩ ¬G|,  U_bg = |¬P ∪ ¬G|

Over a fold, sums are pooled per class c over its episodes E_c:

    IoU_c  = Σ_{e∈E_c} I_fg(e) / max(Σ_{e∈E_c} U_fg(e), 1)
    mIoU   = mean of IoU_c over the fold's test classes (a class never sampled counts 0)
    FB-IoU = ½ (Σ_e I_bg / Σ_e U_bg + Σ_e I_fg / Σ_e U_fg)   (pooled over the fold; a
             zero union is taken as 1, as for the class IoU)

and the 4-fold figure is the mean of the folds' mIoU (and FB-IoU). Scores are percent.
This is not the confusion-matrix mIoU of ``evaluation.semantic``: classes are pooled per
episode class, background included only in FB-IoU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


def episode_areas(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> np.ndarray:
    """int64 [[I_bg, I_fg], [U_bg, U_fg]] of one episode; boolean (H, W) inputs."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    valid = np.ones(gt.shape, bool) if ignore is None else ~np.asarray(ignore, bool)
    if valid.shape != gt.shape:
        raise ValueError(f"ignore shape {valid.shape} differs from ground truth shape {gt.shape}")
    p, g = pred[valid], gt[valid]
    return np.array([[np.sum(~p & ~g), np.sum(p & g)],
                     [np.sum(~p | ~g), np.sum(p | g)]], dtype=np.int64)


@dataclass
class FewShotIoU:
    """Accumulates episode areas per class; ``compute`` gives the fold's scores."""

    test_classes: Sequence[int]
    class_names: Sequence[str] | None = None     # names[c] for class c (index 0 = background)
    intersection: dict[int, np.ndarray] = field(default_factory=dict)   # c -> [I_bg, I_fg]
    union: dict[int, np.ndarray] = field(default_factory=dict)          # c -> [U_bg, U_fg]
    episodes: dict[int, int] = field(default_factory=dict)

    def add(self, cls: int, areas: np.ndarray) -> None:
        if cls not in self.test_classes:
            raise ValueError(f"class {cls} is not a test class of this fold {list(self.test_classes)}")
        areas = np.asarray(areas, np.int64)
        self.intersection[cls] = self.intersection.get(cls, np.zeros(2, np.int64)) + areas[0]
        self.union[cls] = self.union.get(cls, np.zeros(2, np.int64)) + areas[1]
        self.episodes[cls] = self.episodes.get(cls, 0) + 1

    def compute(self) -> dict:
        zero = np.zeros(2, np.int64)
        inter = np.stack([self.intersection.get(c, zero) for c in self.test_classes])   # (C, 2)
        union = np.stack([self.union.get(c, zero) for c in self.test_classes])
        class_iou = inter[:, 1] / np.maximum(union[:, 1], 1)
        pooled = inter.sum(axis=0) / np.maximum(union.sum(axis=0), 1)
        names = self.class_names
        return {
            "mIoU": 100.0 * float(class_iou.mean()),
            "FB-IoU": 100.0 * float(pooled.mean()),
            "IoU_fg": 100.0 * float(pooled[1]),
            "IoU_bg": 100.0 * float(pooled[0]),
            "per_class": [
                {"class": int(c), "name": names[c] if names is not None else str(c),
                 "IoU": 100.0 * float(iou), "episodes": self.episodes.get(c, 0)}
                for c, iou in zip(self.test_classes, class_iou)
            ],
            "episodes": int(sum(self.episodes.values())),
        }


def four_fold_mean(folds: dict[int, dict]) -> dict:
    """Mean mIoU and FB-IoU over folds 0..3 (each a ``FewShotIoU.compute`` result)."""
    if sorted(folds) != [0, 1, 2, 3]:
        raise ValueError(f"the 4-fold mean needs folds 0, 1, 2, 3; got {sorted(folds)}")
    return {key: float(np.mean([folds[f][key] for f in range(4)])) for key in ("mIoU", "FB-IoU")}


def format_table(result: dict, title: str) -> str:
    """Per-class IoU and the fold's mIoU / FB-IoU, percent with one decimal."""
    width = max([5] + [len(r["name"]) for r in result["per_class"]])
    lines = [title, f"{'class':<{width}}  {'IoU %':>6}  episodes"]
    lines += [f"{r['name']:<{width}}  {r['IoU']:>6.1f}  {r['episodes']:>8}" for r in result["per_class"]]
    lines.append(f"mIoU: {result['mIoU']:.1f}%   FB-IoU: {result['FB-IoU']:.1f}%   episodes: {result['episodes']}")
    return "\n".join(lines)
