"""Stage 3 — from captured attention to class scores and labels (paper eq. 3-4).

    cross_k     = mean over blocks 4-8 of the head-averaged cross-attention of k's tokens
    M_k         = class-aware box mask of min-max(cross_k) (CLIP-ES)
    self_cross  = minmax( Self . (Self . (M_k * minmax(cross_k))) )   (= Self^2 with masked columns)
    background  = (tau - max_k self_cross_k) ** p
    labels      = argmax over [background, self_cross_k1, ...]

All functions are pure; nothing here knows about files or the model.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def min_max(x: torch.Tensor) -> torch.Tensor:
    """Normalise each map (over the last two dims) to [0, 1]; a constant map becomes 0
    (the reference divides 0 by 0 there and writes NaN masks)."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    span = x.amax(dim=(-2, -1), keepdim=True) - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(x))


def resize(maps: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize (..., h, w) maps; bilinear is align_corners=False without antialiasing, as
    the reference's torchvision 0.12 did on tensors."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    if mode == "nearest":
        out = F.interpolate(flat, size=size, mode="nearest")
    else:
        out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *size)


def class_cross(cross: Sequence[torch.Tensor], spans: Sequence[Sequence[int]], grid: tuple[int, int]) -> torch.Tensor:
    """Cross-attention map per class: (K, H, W) on the self-attention grid.

    cross: one (h, w, tokens) head-averaged map per block; each class is the mean over
    its token span, bilinearly resized to ``grid``, then averaged over the blocks."""
    per_block = []
    for m in cross:
        k = torch.stack([m[..., list(s)].mean(dim=-1) for s in spans])  # (K, h, w)
        per_block.append(resize(k.float(), grid))
    return torch.stack(per_block).mean(dim=0)


def box_mask(norm_map: np.ndarray, threshold: float) -> np.ndarray:
    """Class-aware box mask (CLIP-ES ``scoremap2bbox`` with every contour).

    The map (in [0, 1]) is scaled to uint8 by truncation; pixels strictly above
    int(threshold * max) form regions; M is the union of each region's bounding box
    [x, min(x + w, W - 1)) x [y, min(y + h, H - 1)). The boxes of OpenCV's RETR_TREE
    contours are those of the 8-connected regions (hole contours lie inside them), so
    connected-component labelling gives the same union.
    """
    h, w = norm_map.shape
    u8 = (np.asarray(norm_map, dtype=np.float32) * np.float32(255)).astype(np.uint8)
    binary = u8 > int(threshold * int(u8.max()))
    regions, _ = ndimage.label(binary, structure=_EIGHT_CONNECTED)
    mask = np.zeros((h, w), dtype=bool)
    for ys, xs in ndimage.find_objects(regions):
        mask[ys.start: min(ys.stop, h - 1), xs.start: min(xs.stop, w - 1)] = True
    return mask


def self_cross(self_attn: torch.Tensor, cross_norm: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Self . (Self . (M * cross)) for all K classes at once: two (N x N) @ (N x K)
    products instead of forming Self^2 (N^3 work). self_attn: (N, N); cross_norm and
    masks: (K, H, W) with H * W = N. Returns (K, H, W)."""
    k, h, w = cross_norm.shape
    v = (cross_norm * masks).reshape(k, h * w).T.to(self_attn.dtype)
    out = self_attn @ (self_attn @ v)
    return out.T.reshape(k, h, w).float()


def propagate(self_attn: torch.Tensor, cross: torch.Tensor, box_threshold: float | None) -> torch.Tensor:
    """Normalised SelfCross maps (K, H, W) of one sample from its Self (N, N) and class
    cross maps (K, H, W). ``box_threshold=None`` skips the box mask."""
    cross_norm = min_max(cross)
    if box_threshold is None:
        masks = torch.ones_like(cross_norm)
    else:
        masks = torch.from_numpy(np.stack([box_mask(m, box_threshold) for m in cross_norm.cpu().numpy()]))
        masks = masks.to(cross_norm.device, cross_norm.dtype)
    return min_max(self_cross(self_attn, cross_norm, masks))


def background(self_cross_maps: torch.Tensor, tau: float, power: float) -> torch.Tensor:
    """(tau - max_k SC_k) ** p, (H, W). For a non-integer p the base is clamped at 0 so
    the score stays real."""
    base = tau - self_cross_maps.amax(dim=0)
    if float(power) != int(power):
        base = base.clamp_min(0)
    return base.pow(power)


def scores_with_background(self_cross_maps: torch.Tensor, tau: float, power: float) -> torch.Tensor:
    """[background, SC_k1, ..., SC_kn]: (K + 1, H, W)."""
    return torch.cat([background(self_cross_maps, tau, power)[None], self_cross_maps])


def labels_to_image(grid_labels: torch.Tensor, geo) -> np.ndarray:
    """A label grid (h, w) at the photo's size, uint8: nearest to the padded input, crop
    the padding, nearest to the original size (the reference's path; integer labels)."""
    padded = (geo.padded_height, geo.padded_width)
    crop = (slice(0, geo.resized_height), slice(0, geo.resized_width))
    labels = resize(resize(grid_labels.float(), padded, "nearest")[crop], (geo.height, geo.width), "nearest")
    return labels.to(torch.uint8).numpy()


def to_image(scores: torch.Tensor, classes: Sequence[int], geo) -> tuple[np.ndarray, np.ndarray]:
    """Labels and score maps at the original image size.

    The label grid (argmax of the grid scores, as class indices) takes
    ``labels_to_image``'s path; the scores take the same path bilinearly and are the
    CRF's input. Returns (labels uint8 (h, w), scores float32 (K + 1, h, w))."""
    lut = torch.tensor([0, *classes], dtype=torch.float32)
    labels = labels_to_image(lut[scores.argmax(dim=0).cpu()], geo)
    padded = (geo.padded_height, geo.padded_width)
    crop = (slice(None), slice(0, geo.resized_height), slice(0, geo.resized_width))
    full = resize(resize(scores.float().cpu(), padded)[crop], (geo.height, geo.width))
    if not torch.isfinite(full).all():
        raise FloatingPointError("non-finite class scores (NaN guard)")
    return labels, full.numpy()
