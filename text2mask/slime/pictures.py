"""Pictures of a SLiMe result: photo | one WAS map per class | labels (numpy/PIL only).

Each WAS panel is the merged, rescaled WAS score of its class (``segment`` step 5),
cut to the photo's part of the canvas, resized to the photo and stretched to black..white
for viewing (a class never kept is black).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from ..visualize import colorize, titled_row


def was_panel(score: np.ndarray, valid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(h, w, 3) uint8 grey view of one class's canvas score map (S, S)."""
    m = np.asarray(score, np.float32)[: valid[0], : valid[1]]
    m = np.asarray(Image.fromarray(m, mode="F").resize((size[1], size[0]), Image.BILINEAR))
    lo, hi = float(m.min()), float(m.max())
    grey = np.zeros(m.shape, np.uint8) if hi <= lo else np.rint(255 * (m - lo) / (hi - lo)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def was_strip(rgb: np.ndarray, scores: np.ndarray, valid: tuple[int, int], labels: np.ndarray,
              names: Sequence[str]) -> Image.Image:
    """photo | WAS of class 0..K-1 | labels, with titles and a legend of the labels."""
    rgb = np.asarray(rgb, np.uint8)
    h, w = rgb.shape[:2]
    if labels.shape != (h, w):
        raise ValueError(f"labels are {labels.shape[1]}x{labels.shape[0]} but the photo is {w}x{h}")
    panels = [("photo", rgb)]
    panels += [(f"WAS {names[k]}", was_panel(scores[k], valid, (h, w))) for k in range(len(names))]
    panels.append(("labels", colorize(labels)))
    return titled_row(panels, np.unique(labels).tolist(), names)
