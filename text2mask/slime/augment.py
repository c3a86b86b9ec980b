"""SLiMe's training augmentation (official ``src/dataset.py``), pure numpy.

    resize S x S -> h-flip (p 0.5) -> Gaussian blur, odd kernel 1..5 (p 0.5)
    -> random square crop of side in [r, 1] * S keeping > 30 % of the focus class's pixels
    -> resize S x S -> rotate by U(-deg, deg) (p 0.5), filled with 0 (= background)

Images resize and rotate bilinearly, masks by nearest neighbour. All draws come from the
caller's ``numpy.random.Generator``, so a fit is reproducible and resumable.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

CROP_KEEP = 0.3          # share of the focus class a crop must keep
CROP_TRIES = 100         # then the whole image (the official loop can spin forever)
BLUR_KERNELS = (1, 3, 5)


@dataclass(frozen=True)
class Augmentation:
    min_crop: float = 0.6      # r: 0.6 car and CelebA, 0.8 horse
    rotate: float = 30.0       # degrees: 30 PASCAL, 10 CelebA
    focus_class: int = 0       # the official counter stays at 0 (background) in practice


def square(rgb: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Both squashed to size x size (aspect not kept, as the official code does)."""
    img = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))
    m = np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))
    return img, m


def gaussian_kernel(ksize: int) -> np.ndarray:
    """OpenCV's kernel for sigma = 0 and an odd size <= 7 is its fixed table, the
    binomial row: [1, 2, 1] / 4 and [1, 4, 6, 4, 1] / 16."""
    k = np.array([1.0])
    for _ in range(ksize - 1):
        k = np.convolve(k, [0.5, 0.5])
    return k


def blur(rgb: np.ndarray, ksize: int) -> np.ndarray:
    if ksize == 1:
        return rgb
    k = gaussian_kernel(ksize)
    out = rgb.astype(np.float64)
    for axis in (0, 1):  # OpenCV's default border (reflect-101) is scipy's "mirror"
        out = ndimage.convolve1d(out, k, axis=axis, mode="mirror")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def crop_box(mask: np.ndarray, min_crop: float, focus: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """(y0, x0, side) of a random square crop that keeps > 30 % of the focus class."""
    size = mask.shape[0]
    total = int((mask == focus).sum())
    for _ in range(CROP_TRIES):
        side = int((min_crop + rng.random() * (1 - min_crop)) * size)
        if side == size:
            return 0, 0, size
        x0 = int(rng.integers(0, size - side + 1))
        y0 = int(rng.integers(0, size - side + 1))
        kept = int((mask[y0:y0 + side, x0:x0 + side] == focus).sum())
        if total == 0 or kept / total > CROP_KEEP:
            return y0, x0, side
    return 0, 0, size


def rotate(rgb: np.ndarray, mask: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    img = Image.fromarray(rgb).rotate(degrees, resample=Image.BILINEAR, fillcolor=(0, 0, 0))
    m = Image.fromarray(mask).rotate(degrees, resample=Image.NEAREST, fillcolor=0)
    return np.asarray(img), np.asarray(m)


def augment(rgb: np.ndarray, mask: np.ndarray, size: int, aug: Augmentation,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One augmented (size x size x 3 uint8 image, size x size uint8 mask) pair."""
    img, m = square(rgb, mask, size)
    if rng.random() < 0.5:
        img, m = img[:, ::-1], m[:, ::-1]
    if rng.random() < 0.5:
        img = blur(img, int(rng.choice(BLUR_KERNELS)))
    y0, x0, side = crop_box(m, aug.min_crop, aug.focus_class, rng)
    img, m = square(np.ascontiguousarray(img[y0:y0 + side, x0:x0 + side]),
                    np.ascontiguousarray(m[y0:y0 + side, x0:x0 + side]), size)
    if aug.rotate and rng.random() < 0.5:
        img, m = rotate(img, m, float(rng.uniform(-aug.rotate, aug.rotate)))
    return np.ascontiguousarray(img), np.ascontiguousarray(m)
