"""SLiMe's training augmentation (official ``src/dataset.py``, albumentations 1.3.0), on
OpenCV as albumentations runs it.

    A.Resize(S, S) -> A.HorizontalFlip (p 0.5) -> A.GaussianBlur(blur_limit=(1, 5)) (p 0.5)
    -> random square crop of side in [r, 1) * S keeping > 30 % of the focus class's pixels
    -> A.Resize(S, S) -> A.Rotate(+-deg) (p 0.5), border constant 0 (= background)

Resizes are ``cv2.resize`` (INTER_LINEAR for images, INTER_NEAREST for masks, the size
unchanged when it already is S x S); the blur is ``cv2.GaussianBlur`` with sigma 0; the
rotation ``cv2.warpAffine`` about the pixel centre (w/2 - 0.5, h/2 - 0.5). The blur size
is drawn as albumentations draws it: an integer in 1..5, an even one moved to the next odd
size, so 1: 0.2, 3: 0.4, 5: 0.4. All draws come from the caller's
``numpy.random.Generator``, so a fit is reproducible and resumable.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

CROP_KEEP = 0.3          # share of the focus class a crop must keep
CROP_TRIES = 100         # then the whole image (the official loop can spin forever)
BLUR_LIMIT = (1, 5)      # A.GaussianBlur(blur_limit=(1, 5))
FLIP_P = BLUR_P = ROTATE_P = 0.5   # albumentations' default p of each transform
# The official DataLoader's worker count (src/dataset.py: num_workers=8). Each worker
# holds its own copy of the dataset's part counter, starting at 0 every epoch (the workers
# are not persistent) and stepping once per sample it serves; batches go to the workers in
# turn. So the k-th step of an epoch crops around class (k // 8) % K: always background in
# 1-shot, background for steps 0-7 and class 1 for steps 8-9 of a 10-shot epoch.
OFFICIAL_LOADER_WORKERS = 8


@dataclass(frozen=True)
class Augmentation:
    min_crop: float = 0.6      # r: 0.6 car and CelebA, 0.8 horse
    rotate: float = 30.0       # degrees: 30 PASCAL, 10 CelebA
    focus_class: int = 0       # the class the crop must keep (``crop_focus``)


def crop_focus(position: int, classes: int, workers: int = OFFICIAL_LOADER_WORKERS) -> int:
    """The focus class of the ``position``-th step (0-based) of an epoch, as the official
    loader's per-worker counters give it (see ``OFFICIAL_LOADER_WORKERS``)."""
    return (position // workers) % classes


def square(rgb: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Both squashed to size x size (aspect not kept), as ``A.Resize`` does."""
    return resize_image(rgb, size), resize_mask(mask, size)


def resize_image(rgb: np.ndarray, size: int) -> np.ndarray:
    if rgb.shape[:2] == (size, size):
        return rgb
    return cv2.resize(np.ascontiguousarray(rgb), (size, size), interpolation=cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    if mask.shape[:2] == (size, size):
        return mask
    return cv2.resize(np.ascontiguousarray(mask), (size, size), interpolation=cv2.INTER_NEAREST)


def blur_kernel(rng: np.random.Generator) -> int:
    """albumentations' kernel draw: randrange(1, 6), an even size moved to the next odd one
    ((k + 1) % 6), giving 1, 3, 5 with probabilities 0.2, 0.4, 0.4."""
    k = int(rng.integers(BLUR_LIMIT[0], BLUR_LIMIT[1] + 1))
    if k % 2 == 0:
        k = (k + 1) % (BLUR_LIMIT[1] + 1)
    return k


def blur(rgb: np.ndarray, ksize: int) -> np.ndarray:
    """``cv2.GaussianBlur`` with sigma 0 (OpenCV's fixed binomial kernel for these sizes;
    size 1 is the identity)."""
    if ksize == 1:
        return rgb
    return cv2.GaussianBlur(np.ascontiguousarray(rgb), (ksize, ksize), 0)


def crop_box(mask: np.ndarray, min_crop: float, focus: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """(y0, x0, side) of a random square crop that keeps > 30 % of the focus class
    (official ``get_random_crop_coordinates``: side int(U[r, 1) * S), corners uniform)."""
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
    """albumentations' ``F.rotate``: counter-clockwise about the pixel centre, constant 0
    border; bilinear for the image, nearest for the mask."""
    h, w = mask.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), degrees, 1.0)
    img = cv2.warpAffine(np.ascontiguousarray(rgb), m, (w, h), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    out = cv2.warpAffine(np.ascontiguousarray(mask), m, (w, h), flags=cv2.INTER_NEAREST,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return img, out


def augment(rgb: np.ndarray, mask: np.ndarray, size: int, aug: Augmentation,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One augmented (size x size x 3 uint8 image, size x size uint8 mask) pair."""
    img, m = square(rgb, mask, size)
    if rng.random() < FLIP_P:
        img, m = img[:, ::-1], m[:, ::-1]
    if rng.random() < BLUR_P:
        img = blur(img, blur_kernel(rng))
    y0, x0, side = crop_box(m, aug.min_crop, aug.focus_class, rng)
    img, m = square(np.ascontiguousarray(img[y0:y0 + side, x0:x0 + side]),
                    np.ascontiguousarray(m[y0:y0 + side, x0:x0 + side]), size)
    if aug.rotate and rng.random() < ROTATE_P:
        img, m = rotate(img, m, float(rng.uniform(-aug.rotate, aug.rotate)))
    return np.ascontiguousarray(img), np.ascontiguousarray(m)
