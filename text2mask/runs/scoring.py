"""Scores of a list of (prediction, ground truth) PNG pairs: one confusion matrix over
all pairs (``evaluation.semantic``), ground truth found per image by the data source."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError
from ..evaluation.semantic import IGNORE, confusion, scores
from ..io import read_index_png


def _check_values(path: Path, a: np.ndarray, num_classes: int) -> None:
    bad = np.unique(a[(a >= num_classes) & (a != IGNORE)]).tolist()
    if bad:
        raise InputError(f"{path}: values {bad} are neither a class index 0..{num_classes - 1} nor {IGNORE}")


def score_pairs(pairs: Sequence[tuple[Path, Path]], num_classes: int, class_names: list[str] | None = None) -> dict:
    """``scores`` of the summed confusion matrix of every (prediction, GT) pair, plus
    ``images``. InputError naming the files for a size mismatch or a value outside the
    class list."""
    if not pairs:
        raise InputError("no (prediction, ground truth) pairs to score")
    conf = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    for pred_path, gt_path in pairs:
        pred, gt = read_index_png(pred_path), read_index_png(gt_path)
        if pred.shape != gt.shape:
            raise InputError(f"size mismatch: prediction {pred_path} is {pred.shape[1]}x{pred.shape[0]} (w x h) "
                             f"but ground truth {gt_path} is {gt.shape[1]}x{gt.shape[0]}")
        _check_values(pred_path, pred, num_classes)
        _check_values(gt_path, gt, num_classes)
        conf += confusion(gt, pred, num_classes)
    return {**scores(conf, class_names), "images": len(pairs)}
