"""``text2mask fewshot segment``: one's own photos from examples. Supports are
(photo, mask) pairs; every query gets an index PNG at its own size (0 background,
1 the object shown by the supports) and, on request, a picture of the episode."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import InputError
from ..io import read_image, write_index_png, write_png
from .model import DiffewS, check_support, episode_inputs
from .visual import episode_strip


def read_mask(path: str | Path, cls: int | None = None) -> np.ndarray:
    """(H, W) bool object mask. A single-channel (index or grey) PNG: pixels equal to
    ``cls`` when given, else every non-zero pixel; an RGB(A) picture: pixels brighter
    than mid-grey (a white object on black)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: mask file not found")
    try:
        with Image.open(path) as im:
            mode = im.mode
            a = np.asarray(im)
    except Exception as e:  # noqa: BLE001 - PIL raises several types on a bad file
        raise InputError(f"{path}: cannot read mask ({type(e).__name__}: {e})") from None
    if mode in ("P", "L", "I", "I;16", "1"):
        return a == cls if cls is not None else a != 0
    if cls is not None:
        raise InputError(f"{path}: --class needs a single-channel index mask, got mode {mode}")
    return np.asarray(read_image(path), np.float32).mean(axis=2) > 127.5


def parse_pair(text: str) -> tuple[Path, Path]:
    image, sep, mask = text.rpartition(":")
    if not sep or not image or not mask:
        raise InputError(f"--support {text!r}: expected IMAGE:MASK")
    return Path(image), Path(mask)


def read_supports(pairs: Sequence[tuple[Path, Path]], cls: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for image, mask_path in pairs:
        rgb, mask = read_image(image), read_mask(mask_path, cls)
        check_support(rgb, mask, f"{image} / {mask_path}")
        out.append((rgb, mask))
    return out


def segment(model: DiffewS, supports: list[tuple[np.ndarray, np.ndarray]], queries: Sequence[Path], out: Path,
            visualize: bool = False, batch_size: int = 1, log=print) -> list[Path]:
    """Masks of ``queries`` into ``out/<stem>.png``; pictures into ``out/visual/``."""
    stems = [Path(q).stem for q in queries]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise InputError(f"queries share the file name(s) {', '.join(dup)}: their masks would overwrite each other")
    photos = [read_image(q) for q in queries]          # every input read before anything is written
    written = []
    for start in range(0, len(photos), batch_size):
        chunk = photos[start:start + batch_size]
        scores = model.predict([episode_inputs(rgb, supports, model.config.resolution) for rgb in chunk])
        for stem, rgb, s in zip(stems[start:start + batch_size], chunk, scores):
            mask = s.mask(rgb.shape[:2])
            path = Path(out) / f"{stem}.png"
            write_index_png(path, mask.astype(np.uint8))
            if visualize:
                write_png(Path(out) / "visual" / f"{stem}.png", episode_strip(supports, rgb, mask, None, "example"))
            log(f"{path}: {int(mask.sum())} of {mask.size} pixels")
            written.append(path)
    return written
