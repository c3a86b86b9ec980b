"""The annotated photos a fit learns from: reading and checking them (file I/O edge).

A mask is an index PNG or a ``.npy`` array at the photo's size with values 0..K-1
(0 = background; there is no ignore value, as in the official code). Every listed class
must occur in at least one training mask: an absent class would get CE weight 0 and
never be learned.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError
from ..evaluation.parts import read_mask
from ..io import read_image
from .fit import Example


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


def read_example(image: str | Path, mask: str | Path, classes: Sequence[str]) -> Example:
    rgb, m = read_image(image), read_mask(mask)
    if m.shape != rgb.shape[:2]:
        raise InputError(f"{mask}: mask is {m.shape[1]}x{m.shape[0]} (w x h) but its image {image} is "
                         f"{rgb.shape[1]}x{rgb.shape[0]}")
    bad = np.unique(m[m >= len(classes)]).tolist()
    if bad:
        raise InputError(f"{mask}: values {bad} are not class indices 0..{len(classes) - 1} "
                         f"of {','.join(classes)}")
    return Example(Path(image).stem, rgb, m)


def read_examples(images: Sequence[str | Path], masks: Sequence[str | Path],
                  classes: Sequence[str]) -> list[Example]:
    """Training pairs, checked: one mask per image, sizes, values, every class present."""
    if not images:
        raise InputError("no training image: pass --image PHOTO --mask MASK (once per annotated photo)")
    if len(images) != len(masks):
        raise InputError(f"{len(images)} --image but {len(masks)} --mask: give one mask per image, in order")
    examples = [read_example(i, m, classes) for i, m in zip(images, masks)]
    seen = set().union(*(np.unique(e.mask).tolist() for e in examples))
    absent = [f"{k} ({classes[k]})" for k in range(len(classes)) if k not in seen]
    if absent:
        raise InputError(f"class(es) {', '.join(absent)} occur in none of the masks "
                         f"{', '.join(str(m) for m in masks)}; every listed class needs pixels to learn from")
    return examples
