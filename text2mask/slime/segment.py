"""SLiMe inference (official ``get_patched_masks``): tiles, WAS per kept class, merge.

On the S x S canvas (S = 512; the photo squashed to it by ``cv2.resize`` as the official
``A.Resize`` does, or padded with ``keep_aspect``):

1. n x n square tiles of side P, stride (S - P) // (n - 1); each tile is resized back to
   S x S (a zoom, no extra resolution).
2. Per tile, at t = 100: the 77-way cross probabilities c_k (K, h, w) of the class tokens
   with min m_k and max M_k, and the self-attention A.
3. Class k is kept when M_k >= 0.2; the first kept map (assumed background) is zeroed
   where it is <= its own mean.
4. For each kept k: WAS_k = A . c_k, resized bilinearly to P x P, mapped affinely onto
   [m_k, M_k] (a constant WAS map or m_k = M_k gives m_k everywhere); added into a
   K x S x S sum and a per-pixel count.
5. scores = sum / (count + 1e-7); labels = argmax (nothing kept -> 0, background).

Labels are written at the ORIGINAL image size: the K score maps are resized bilinearly
(after cutting away the padding), then the argmax is taken.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch

from ..errors import ConfigError
from ..modeling.capture import AttentionCapture
from ..modeling.latents import q_sample
from ..preprocess import PAD_RGB
from ..wsss.propagate import resize
from . import augment as AUG
from . import diffusion as D
from . import maps as M

CANVAS = 512
CLASS_THRESHOLD = 0.2
TEST_TIMESTEP = 100
COUNT_EPSILON = 1e-7   # the official per-pixel count starts here, so unvisited pixels give 0


@dataclass(frozen=True)
class Tile:
    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def side(self) -> int:
        return self.y1 - self.y0


def tiles(canvas: int, side: int, per_side: int) -> list[Tile]:
    """n x n tiles of ``side`` pixels over a ``canvas`` square, row-major, with the
    official integer stride (canvas - side) // (n - 1) (0 for one tile)."""
    if not 0 < side <= canvas:
        raise ValueError(f"tile size {side} must lie in 1..{canvas}")
    if per_side < 1:
        raise ValueError(f"tiles per side must be >= 1, got {per_side}")
    stride = 0 if per_side == 1 else (canvas - side) // (per_side - 1)
    return [Tile(i * stride, i * stride + side, j * stride, j * stride + side)
            for i in range(per_side) for j in range(per_side)]


def kept_classes(cross: torch.Tensor, threshold: float) -> list[int]:
    """Classes whose cross probability reaches ``threshold`` somewhere in the tile."""
    peak = cross.amax(dim=(-2, -1))
    return [k for k in range(cross.shape[0]) if float(peak[k]) >= threshold]


def background_cut(cross_map: torch.Tensor) -> torch.Tensor:
    """Zero the map where it is <= its mean (applied to the first kept class)."""
    return torch.where(cross_map > cross_map.mean(), cross_map, torch.zeros_like(cross_map))


def affine_onto(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Map x's range [min x, max x] affinely onto [lo, hi]; a constant x or lo == hi
    gives lo everywhere (what the official 1e-7 / inf coefficients amount to)."""
    x_lo, x_hi = x.min(), x.max()
    if not float(x_hi) > float(x_lo) or not hi > lo:
        return torch.full_like(x, lo)
    return lo + (x - x_lo) * ((hi - lo) / (x_hi - x_lo))


@dataclass
class TileScores:
    """One tile's contribution: the kept classes and their rescaled WAS maps (P x P)."""

    tile: Tile
    kept: list[int]
    maps: torch.Tensor   # (len(kept), P, P)


def tile_scores(cross: torch.Tensor, self_attn: torch.Tensor, tile: Tile, threshold: float) -> TileScores:
    """Steps 3-4 for one tile: cross (K, h, w) 77-way probabilities on the self grid,
    self_attn (N, N)."""
    kept = kept_classes(cross, threshold)
    if not kept:
        return TileScores(tile, [], cross.new_zeros((0, tile.side, tile.side)))
    lo, hi = cross.amin(dim=(-2, -1)), cross.amax(dim=(-2, -1))
    c = cross[kept].clone()
    c[0] = background_cut(c[0])
    was_maps = resize(M.was(self_attn, c).float(), (tile.side, tile.side))
    return TileScores(tile, kept, torch.stack([affine_onto(was_maps[i], float(lo[k]), float(hi[k]))
                                               for i, k in enumerate(kept)]))


def merge(parts: Sequence[TileScores], classes: int, canvas: int) -> torch.Tensor:
    """Step 5: (K, S, S) mean of the tiles' rescaled WAS maps where they were kept."""
    total = torch.zeros(classes, canvas, canvas)
    count = torch.full((classes, canvas, canvas), COUNT_EPSILON)
    for p in parts:
        t = p.tile
        for i, k in enumerate(p.kept):
            total[k, t.y0:t.y1, t.x0:t.x1] += p.maps[i].cpu()
            count[k, t.y0:t.y1, t.x0:t.x1] += 1
    return total / count


def labels_at(scores: torch.Tensor, valid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """uint8 (h, w) labels at the original size: the canvas scores are cut to the
    ``valid`` (rows, cols) region (the photo without padding), resized bilinearly to
    ``size``, then argmaxed."""
    full = resize(scores[:, : valid[0], : valid[1]].float(), size)
    return full.argmax(dim=0).to(torch.uint8)


# -- model side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentSettings:
    timestep: int = TEST_TIMESTEP
    tiles: int = 1                  # per side; the official PASCAL runs use 1, CelebA 2
    tile_size: int = CANVAS         # CelebA: 400
    class_threshold: float = CLASS_THRESHOLD
    keep_aspect: bool = False       # pad to a square instead of squashing (not official)
    canvas: int = CANVAS
    bgr: bool = False               # feed the photo as B, G, R (the official HEAD's cv2.imread)

    def check(self) -> "SegmentSettings":
        """ConfigError (exit 2) naming the option of the first setting out of range."""
        whole = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
        rules = [
            ("--t", self.timestep, whole(self.timestep) and 0 <= self.timestep <= 999, "an integer in 0..999"),
            ("--tiles", self.tiles, whole(self.tiles) and self.tiles >= 1, "an integer >= 1"),
            ("--canvas", self.canvas, whole(self.canvas) and self.canvas >= 64 and self.canvas % 64 == 0,
             "a multiple of 64 (the UNet's grids)"),
            ("--tile-size", self.tile_size, whole(self.tile_size) and 8 <= self.tile_size <= self.canvas,
             f"an integer in 8..{self.canvas} (the canvas side)"),
            ("--class-threshold", self.class_threshold,
             isinstance(self.class_threshold, (int, float)) and not isinstance(self.class_threshold, bool)
             and math.isfinite(self.class_threshold) and self.class_threshold >= 0, "finite and >= 0"),
            ("--keep-aspect", self.keep_aspect, isinstance(self.keep_aspect, bool), "true or false"),
            ("--bgr", self.bgr, isinstance(self.bgr, bool), "true or false"),
        ]
        for option, value, ok, want in rules:
            if not ok:
                raise ConfigError(f"{option} {value}: must be {want}")
        return self


@dataclass(frozen=True)
class Canvas:
    """The photo on the S x S canvas: pixels (3, S, S) in [-1, 1] and the (rows, cols)
    it covers (all of it when squashed; the photo without its padding with keep_aspect)."""
    x: torch.Tensor
    valid: tuple[int, int]


def channels(rgb: np.ndarray, bgr: bool) -> np.ndarray:
    """The photo in the channel order the model is fed: RGB, or B, G, R with ``bgr``."""
    return np.ascontiguousarray(rgb[..., ::-1]) if bgr else rgb


def to_canvas(rgb: np.ndarray, size: int, keep_aspect: bool, bgr: bool = False) -> Canvas:
    """Squash to size x size (official ``A.Resize``: ``cv2.resize`` INTER_LINEAR), or
    resize the long side to ``size`` and pad right/bottom with ``preprocess.PAD_RGB``
    (``keep_aspect``); channels as ``channels`` gives them."""
    h, w = rgb.shape[:2]
    if not keep_aspect:
        return Canvas(D.pixels(channels(AUG.resize_image(rgb, size), bgr)), (size, size))
    s = size / max(h, w)
    rh, rw = max(1, round(h * s)), max(1, round(w * s))
    img = np.empty((size, size, 3), np.uint8)
    img[...] = PAD_RGB
    img[:rh, :rw] = rgb if (rh, rw) == (h, w) else cv2.resize(np.ascontiguousarray(rgb), (rw, rh),
                                                               interpolation=cv2.INTER_LINEAR)
    return Canvas(D.pixels(channels(img, bgr)), (rh, rw))


def tile_batch(x: torch.Tensor, boxes: Sequence[Tile]) -> torch.Tensor:
    """(n^2, 3, S, S): each tile of the (3, S, S) canvas resized back to S x S
    (bilinear, align_corners=False, as the official ``F.interpolate``)."""
    size = tuple(x.shape[-2:])
    return torch.stack([resize(x[:, b.y0:b.y1, b.x0:b.x1], size) for b in boxes])


def noisy_tiles(sd, x: torch.Tensor, boxes: Sequence[Tile], timestep: int,
                generator: torch.Generator) -> torch.Tensor:
    """(n^2, 4, h, w) z_t of one canvas's tiles: posterior sample, then noise at t; both
    draws from the image's own generator, so batching never changes a mask."""
    z0 = D.encode(sd, tile_batch(x, boxes), generator)
    noise = torch.randn(z0.shape, generator=generator).to(z0.device)
    return q_sample(z0, sd.alphas_cumprod[timestep].to(z0.device, torch.float32), noise)


def canvas_scores(sd, cond: torch.Tensor, classes: int, canvases: Sequence[torch.Tensor],
                  settings: SegmentSettings, generators: Sequence[torch.Generator]) -> list[torch.Tensor]:
    """(K, S, S) merged scores per canvas (3, S, S): steps 1-5, one UNet call over every
    tile of every canvas, conditional row only (the maps do not depend on the
    unconditional one)."""
    boxes = tiles(settings.canvas, settings.tile_size, settings.tiles)
    z_t = torch.cat([noisy_tiles(sd, x, boxes, settings.timestep, g) for x, g in zip(canvases, generators)])
    texts = cond.to(sd.device, sd.dtype).expand(z_t.shape[0], -1, -1)
    with torch.no_grad(), AttentionCapture(sd.unet, M.CROSS_BLOCKS, M.SELF_BLOCKS) as cap:
        maps = cap.run(z_t.to(sd.dtype), torch.tensor(settings.timestep, device=sd.device), texts)
    out = []
    for n in range(len(canvases)):
        rows = range(n * len(boxes), (n + 1) * len(boxes))
        parts = [tile_scores(M.test_cross([maps.cross[b][r] for b in M.CROSS_BLOCKS], classes, maps.grid),
                             maps.self_attn[r], box, settings.class_threshold) for r, box in zip(rows, boxes)]
        out.append(merge(parts, classes, settings.canvas))
    return out
