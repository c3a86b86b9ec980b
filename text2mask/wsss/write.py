"""Stage 5 — refine and write one image's outputs (runs in the CRF worker processes).

    initial/<id>.png  labels before the CRF
    crf/<id>.png      labels after the CRF (no ignore)
    masks/<id>.png    training mask, 255 = unsure; written LAST: with the image's record
                      (written before, by the engine) its presence marks the image as
                      complete (every file is written atomically)
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..io import write_index_png
from .result import Attention, MaskConfig, refine

FOLDERS = ("initial", "crf", "masks")


def output_path(out: Path, folder: str, key: str) -> Path:
    return Path(out) / folder / f"{key}.png"


def _at_size(labels: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    if size is None or labels.shape == tuple(size):
        return labels
    return np.asarray(Image.fromarray(labels).resize((size[1], size[0]), Image.NEAREST))


def finish(att: Attention, rgb: np.ndarray, cfg: MaskConfig, out: Path) -> tuple[str, float]:
    """CRF + the three PNGs of one image; returns (id, seconds spent)."""
    start = time.perf_counter()
    res = refine(att, rgb, cfg)
    write = lambda folder, labels: write_index_png(  # noqa: E731
        output_path(out, folder, att.key), _at_size(labels, att.full_size))
    write("initial", res.labels)
    if res.crf is not None:
        write("crf", res.crf)
        write("masks", res.mask)
    else:  # --no-crf: the training mask is the initial labels
        write("masks", res.labels)
    return att.key, time.perf_counter() - start
