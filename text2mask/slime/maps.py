"""SLiMe's attention maps (paper section 3, official ``get_attention_map``), pure tensors.

Shapes: K classes (index 0 = background), a self-attention grid H x W with N = H * W.

    training cross  C_k = softmax_k( mean_layers resize_{HxW}( head-mean logits of token k ) )
    test cross      c_k = mean_layers resize_{HxW}( head-mean softmax_77(logits)[token k] )
    WAS             WAS_k = A . vec(C_k)        (A: N x N, rows = queries, row-stochastic)

The official code resizes every head before the head mean; bilinear resizing is linear,
so resizing the head mean gives the same map. Because A is row-stochastic and the K-way
softmax sums to one per pixel, sum_k WAS_k = 1 at every pixel in training.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..wsss.propagate import resize

# Forward-order transformer blocks (``modeling.capture.transformer_blocks``), the same in
# SD 1.x and 2.x: cross-attention of up_blocks.1.attentions.0-2 and up_blocks.2.attentions.0-1
# (grids S/32 and S/16), self-attention of up_blocks.3.attentions.0-2 (grid S/8).
CROSS_BLOCKS = (7, 8, 9, 10, 11)
SELF_BLOCKS = (13, 14, 15)


def layer_mean(maps: Sequence[torch.Tensor], tokens: int, grid: tuple[int, int]) -> torch.Tensor:
    """(K, H, W): the first ``tokens`` columns of each layer's (h, w, T) map, bilinearly
    resized (align_corners=False) to ``grid``, averaged over the layers."""
    per_layer = [resize(m[..., :tokens].permute(2, 0, 1).float(), grid) for m in maps]
    return torch.stack(per_layer).mean(dim=0)


def training_cross(logits: Sequence[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
    """Layer-mean logits (K, H, W) of the K class tokens: the CE loss's input. Each
    element of ``logits`` is one cross layer's (h, w, K) head-mean pre-softmax scores."""
    return layer_mean(logits, logits[0].shape[-1], grid)


def k_way_softmax(cross_logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the K class tokens only (dim 0 of (K, H, W)), as in training."""
    return cross_logits.softmax(dim=0)


def test_cross(probs: Sequence[torch.Tensor], classes: int, grid: tuple[int, int]) -> torch.Tensor:
    """(K, H, W) 77-way attention probabilities of the K class tokens (positions 0..K-1),
    resized to ``grid`` and averaged over the layers. ``probs``: (h, w, 77) per layer."""
    return layer_mean(probs, classes, grid)


def was(self_attn: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """Weighted accumulated self-attention WAS_k = A . vec(cross_k): (K, H, W).

    self_attn: (N, N) rows = queries; cross: (K, H, W) with H * W = N. Each pixel
    gathers the cross values of the pixels it attends to."""
    k, h, w = cross.shape
    if self_attn.shape != (h * w, h * w):
        raise ValueError(f"self-attention {tuple(self_attn.shape)} does not match a {h}x{w} grid")
    return (self_attn @ cross.reshape(k, h * w).T.to(self_attn.dtype)).T.reshape(k, h, w)
