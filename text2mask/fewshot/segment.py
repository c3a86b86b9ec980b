"""``text2mask fewshot segment``: one's own photos from examples. Supports are
(photo, mask) pairs; every query gets an index PNG at its own size (0 background,
1 the object shown by the supports) and, on request, a picture of the episode.

Support masks are read by the one binary-mask rule of every method
(``io.read_binary_mask``): with ``cls``, the pixels of that index in an index PNG;
else a mask with varying transparency marks its opaque pixels, a single-channel mask
its non-zero pixels, an RGB picture the pixels whose brightest channel passes mid-grey.
A mask is never composited on white."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError
from ..guard import safe_name
from ..io import read_binary_mask, read_image, write_index_png, write_png
from .evaluate import RANDOM_BANNER
from .model import DiffewS, check_support, episode_inputs
from .visual import episode_strip


def parse_pair(text: str) -> tuple[Path, Path]:
    image, sep, mask = text.rpartition(":")
    if not sep or not image or not mask:
        raise InputError(f"--support {text!r}: expected IMAGE:MASK")
    return Path(image), Path(mask)


def read_supports(pairs: Sequence[tuple[Path, Path]], cls: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every support photo and its mask; a mask of another size or without an object
    pixel is refused (exit 2) before the model loads."""
    out = []
    for image, mask_path in pairs:
        rgb, mask = read_image(image), read_binary_mask(mask_path, cls)
        check_support(rgb, mask, f"{image} / {mask_path}")
        out.append((rgb, mask))
    return out


def output_names(queries: Sequence[Path]) -> list[str]:
    """The file name (stem) each query's mask gets in the output folder: a safe name
    (``guard.safe_name``), and no two queries alike (one would overwrite the other)."""
    stems = [safe_name(Path(q).stem, "query file stem") for q in queries]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise InputError(f"queries share the file name(s) {', '.join(dup)}: their masks would overwrite each other")
    return stems


def segment(model: DiffewS, supports: list[tuple[np.ndarray, np.ndarray]], queries: Sequence[Path], out: Path,
            visualize: bool = False, batch_size: int = 1, log=print) -> list[Path]:
    """Masks of ``queries`` into ``out/<stem>.png``; pictures into ``out/visual/``."""
    stems = output_names(queries)
    photos = [read_image(q) for q in queries]          # every input read before anything is written
    random = bool(model.sd.info.get("random_weights"))
    note = " (random weights: meaningless)" if random else ""
    written = []
    for start in range(0, len(photos), batch_size):
        chunk = photos[start:start + batch_size]
        scores = model.predict([episode_inputs(rgb, supports, model.config.resolution) for rgb in chunk])
        for stem, rgb, s in zip(stems[start:start + batch_size], chunk, scores):
            mask = s.mask(rgb.shape[:2])
            path = Path(out) / f"{stem}.png"
            write_index_png(path, mask.astype(np.uint8))
            if visualize:
                write_png(Path(out) / "visual" / f"{stem}.png",
                          episode_strip(supports, rgb, mask, None, "example", banner=RANDOM_BANNER if random else None))
            log(f"{path}: {int(mask.sum())} of {mask.size} pixels{note}")
            written.append(path)
    return written
