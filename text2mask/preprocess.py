"""Image geometry of the reference: aspect-ratio dependent long side, pad to a multiple of 64.

r = max(h/w, w/h) picks the long side L (1024, 960, 896, 832, 768 or 704); the short side
becomes int(L * short / long); bilinear resize, then pad right/bottom with (123, 117, 104)
up to a multiple of 64. Masks are cropped back by the same geometry.

``prepare_square`` is the other input convention (SLiMe, DiffewS): a bilinear squash to
size x size (512 for SD 1.x/2.x-base), aspect ratio not kept, no padding.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

PAD_RGB = (123, 117, 104)
MULTIPLE = 64
# (ratio strictly above, long side), checked in order; else 704.
_BANDS = ((16 / 7, 1024), (15 / 8, 960), (14 / 8, 896), (13 / 9, 832), (12 / 10, 768))


@dataclass(frozen=True)
class Geometry:
    height: int          # original image
    width: int
    resized_height: int  # after the resize, before padding
    resized_width: int
    padded_height: int   # UNet input (multiple of 64)
    padded_width: int

    @property
    def latent(self) -> tuple[int, int]:
        return self.padded_height // 8, self.padded_width // 8


def long_side(height: int, width: int) -> int:
    r = max(height / width, width / height)
    for bound, side in _BANDS:
        if r > bound:
            return side
    return 704


def _pad_up(n: int) -> int:
    return n if n % MULTIPLE == 0 else n - n % MULTIPLE + MULTIPLE


def geometry(height: int, width: int, side: int | None = None) -> Geometry:
    """The reference's resize-and-pad of an h x w photo; ``side`` replaces the
    aspect-ratio rule's long side (e.g. small photos for a fast CPU run)."""
    if height < 1 or width < 1:
        raise ValueError(f"image has no pixels ({width}x{height})")
    side = side or long_side(height, width)
    if width > height:
        rw, rh = side, int(side * height / width)
    else:
        rw, rh = int(side * width / height), side
    # A very thin image must keep at least one row/column of real pixels.
    rw, rh = max(rw, 1), max(rh, 1)
    return Geometry(height, width, rh, rw, _pad_up(rh), _pad_up(rw))


def prepare(rgb: np.ndarray, geo: Geometry) -> torch.Tensor:
    """(3, padded_h, padded_w) float32 in [-1, 1]: bilinear resize (PIL, as the reference's
    torchvision-on-PIL transform did), pad right/bottom, scale."""
    img = Image.fromarray(rgb).resize((geo.resized_width, geo.resized_height), Image.BILINEAR)
    canvas = np.empty((geo.padded_height, geo.padded_width, 3), dtype=np.uint8)
    canvas[...] = PAD_RGB
    canvas[: geo.resized_height, : geo.resized_width] = np.asarray(img)
    x = torch.from_numpy(canvas).permute(2, 0, 1).float() / 255.0
    return x * 2.0 - 1.0


def prepare_square(rgb: np.ndarray, size: int = 512) -> torch.Tensor:
    """(3, size, size) float32 in [-1, 1]: bilinear resize (PIL) of the whole photo to a
    square, aspect ratio not kept; maps are resized back to (h, w) by the caller."""
    if size < 8 or size % 8:
        raise ValueError(f"square size must be a positive multiple of 8 (the VAE's factor), got {size}")
    img = Image.fromarray(rgb).resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0
    return x * 2.0 - 1.0


def shrink(rgb: np.ndarray, max_pixels: int | None) -> np.ndarray:
    """Area-downscale a photo above ``max_pixels`` (aspect kept) so the score maps and the
    CRF of a huge photo stay memory-bounded; its masks are scaled back up when written.
    The model sees at most a 1024-pixel side either way."""
    h, w = rgb.shape[:2]
    if not max_pixels or h * w <= max_pixels:
        return rgb
    s = (max_pixels / (h * w)) ** 0.5
    size = (max(1, int(w * s)), max(1, int(h * s)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BOX))
