"""The annotated photos a fit learns from: reading and checking them (file I/O edge).

A mask is an index PNG (``io.read_index_png``: palette or grey values; an RGB(A) picture
only when grey and fully opaque, never composited on white) or a ``.npy`` array, at the
photo's size, with values 0..K-1 (0 = background; there is no ignore value, as in the
official code). A mask may lack some classes (their CE weight is 0 on that pair, as in the
official code), but every listed class must occur in at least one training mask: the
official code would train a class with no pixels anywhere on its MSE term alone (its CE
weight is always 0) and then segment with a meaningless row, so it is refused here.

Folders (``--train-dir``, ``--val-dir``) pair photos and masks by file stem, directly in
the folder (``pair_folder``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError
from ..evaluation.parts import read_mask
from ..io import IMAGE_SUFFIXES, read_image
from ..runs.records import file_digest
from .fit import Example

MASK_SUFFIX = ".npy"   # the official layout: <stem>.png photo + <stem>.npy mask


def parse_classes(text: str | Sequence[str]) -> list[str]:
    """Class names in index order from "background,body,..." or a list; 0 = background."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    if not any(names):
        raise InputError("the class list is empty: pass --classes \"background,part1,part2,...\" "
                         "(index order, background first)")
    if not all(names):
        raise InputError(f"the class list {','.join(names)!r} has an empty name")
    if len(set(names)) != len(names):
        raise InputError(f"the class list {','.join(names)!r} names a class twice")
    if len(names) < 2:
        raise InputError("the class list needs background and at least one part")
    return names


def pair_folder(folder: str | Path, what: str = "--train-dir") -> list[tuple[Path, Path]]:
    """(photo, mask) pairs of a folder, in stem order. The rule, per file stem (hidden files
    and other suffixes are ignored):

    - ``<stem>.npy`` present: it is the mask, and the one image file of that stem (any
      photo suffix, ``.png`` included) is the photo (the official layout);
    - else ``<stem>.png`` beside a photo of another suffix (``car.jpg`` + ``car.png``):
      the ``.png`` is the mask.

    Anything else (a photo without a mask, a mask without a photo, two photos of one
    stem) is refused naming the files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{what} {folder}: not a folder")
    groups: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        suffix = p.suffix.lower()
        if p.name.startswith(".") or not p.is_file() or (suffix not in IMAGE_SUFFIXES and suffix != MASK_SUFFIX):
            continue
        groups.setdefault(p.stem, []).append(p)
    if not groups:
        raise InputError(f"{what} {folder}: no photo/mask pairs (<stem>.png + <stem>.npy, or "
                         "<stem>.jpg + <stem>.png)")
    pairs = []
    for stem, files in groups.items():
        masks = [p for p in files if p.suffix.lower() == MASK_SUFFIX]
        photos = [p for p in files if p.suffix.lower() != MASK_SUFFIX]
        if not masks and len(photos) >= 2 and sum(p.suffix.lower() == ".png" for p in photos) == 1:
            masks = [p for p in photos if p.suffix.lower() == ".png"]
            photos = [p for p in photos if p.suffix.lower() != ".png"]
        names = ", ".join(p.name for p in files)
        if not photos:
            raise InputError(f"{what} {folder}: mask {masks[0].name} has no photo of the stem {stem!r}")
        if not masks:
            raise InputError(f"{what} {folder}: photo {photos[0].name} has no mask ({stem}.npy, or {stem}.png "
                             "beside a photo of another format)")
        if len(photos) > 1:
            raise InputError(f"{what} {folder}: the stem {stem!r} has several photos ({names}); keep one")
        pairs.append((photos[0], masks[0]))
    return pairs


def read_example(image: str | Path, mask: str | Path, classes: Sequence[str]) -> Example:
    rgb, m = read_image(image), read_mask(mask)
    if m.shape != rgb.shape[:2]:
        raise InputError(f"{mask}: mask is {m.shape[1]}x{m.shape[0]} (w x h) but its image {image} is "
                         f"{rgb.shape[1]}x{rgb.shape[0]}")
    bad = np.unique(m[m >= len(classes)]).tolist()
    if bad:
        raise InputError(f"{mask}: values {bad} are not class indices 0..{len(classes) - 1} "
                         f"of {','.join(classes)}")
    digest = f"{file_digest(image, 'image file')}:{file_digest(mask, 'mask file')}"
    return Example(Path(image).stem, rgb, m, digest)


def read_examples(images: Sequence[str | Path], masks: Sequence[str | Path],
                  classes: Sequence[str]) -> list[Example]:
    """Training pairs, checked: one mask per image, sizes, values, every class present."""
    if not images:
        raise InputError("no training image: pass --image PHOTO --mask MASK (once per annotated photo) "
                         "or --train-dir FOLDER")
    if len(images) != len(masks):
        raise InputError(f"{len(images)} --image but {len(masks)} --mask: give one mask per image, in order")
    examples = [read_example(i, m, classes) for i, m in zip(images, masks)]
    seen = set().union(*(np.unique(e.mask).tolist() for e in examples))
    absent = [f"{k} ({classes[k]})" for k in range(len(classes)) if k not in seen]
    if absent:
        raise InputError(f"class(es) {', '.join(absent)} occur in none of the masks "
                         f"{', '.join(str(m) for m in masks)}; every listed class needs pixels to learn from")
    return examples
