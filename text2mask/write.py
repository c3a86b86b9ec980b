"""Stage 5 — refine and write one image's outputs (runs in the CRF worker processes).

    initial/<id>.png  labels before the CRF
    crf/<id>.png      labels after the CRF (no ignore)
    masks/<id>.png    training mask, 255 = unsure; written LAST, so its presence marks
                      the image as complete (every file is written atomically)
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .io import write_index_png
from .result import Attention, MaskConfig, refine

FOLDERS = ("initial", "crf", "masks")


def output_path(out: Path, folder: str, key: str) -> Path:
    return Path(out) / folder / f"{key}.png"


def is_complete(out: Path, key: str) -> bool:
    return output_path(out, "masks", key).is_file()


def finish(att: Attention, rgb: np.ndarray, cfg: MaskConfig, out: Path) -> tuple[str, float]:
    """CRF + the three PNGs of one image; returns (id, seconds spent)."""
    start = time.perf_counter()
    res = refine(att, rgb, cfg)
    write_index_png(output_path(out, "initial", att.key), res.labels)
    if res.crf is not None:
        write_index_png(output_path(out, "crf", att.key), res.crf)
        write_index_png(output_path(out, "masks", att.key), res.mask)
    else:  # --no-crf: the training mask is the initial labels
        write_index_png(output_path(out, "masks", att.key), res.labels)
    return att.key, time.perf_counter() - start
