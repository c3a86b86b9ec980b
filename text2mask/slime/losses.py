"""SLiMe's training objective (official ``training_step``), pure tensors.

    L = CE_w(cross_logits, mask) + lambda_was * K * mean((WAS - onehot(mask))^2)
        + lambda_sd * mean((eps_u + g (eps_c - eps_u) - target)^2)

with lambda_was = 1, lambda_sd = 0.005, guidance g = 100 (the code's SD loss is the
guided prediction, not the plain noise loss the paper writes). Class weights of the CE:
background 1; a part c present in the mask (non-background pixels) / (pixels of c); an
absent part 0. The mask lives on the self-attention grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

EPSILON = "epsilon"
V_PREDICTION = "v_prediction"


def class_weights(mask: torch.Tensor, classes: int) -> torch.Tensor:
    """(K,) CE weights from an (H, W) integer mask on the loss grid."""
    counts = torch.bincount(mask.reshape(-1).long(), minlength=classes)[:classes].double()
    parts = counts[1:].sum()
    w = torch.where(counts > 0, parts / counts.clamp_min(1), torch.zeros_like(counts))
    w[0] = 1.0
    return w.float()


def cross_entropy(cross_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Weighted CE of (K, H, W) logits against the (H, W) mask: PyTorch's weighted mean
    sum_i w[y_i] nll_i / sum_i w[y_i]."""
    weights = class_weights(mask, cross_logits.shape[0]).to(cross_logits.device)
    return F.cross_entropy(cross_logits[None].float(), mask[None].long(), weight=weights)


def one_hot(mask: torch.Tensor, classes: int) -> torch.Tensor:
    """(K, H, W) float one-hot of an (H, W) mask."""
    return F.one_hot(mask.long(), classes).permute(2, 0, 1).float()


def was_mse(was_maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """K * mean over K*H*W of (WAS - one-hot)^2 (= the paper's sum of per-class MSEs)."""
    k = was_maps.shape[0]
    return F.mse_loss(was_maps.float(), one_hot(mask, k).to(was_maps.device)) * k


def sd_target(prediction_type: str, noise: torch.Tensor, latents: torch.Tensor,
              alpha_bar: torch.Tensor) -> torch.Tensor:
    """What the UNet predicts: the noise (epsilon models, SD 2.1-base) or
    v = sqrt(a) eps - sqrt(1 - a) z0 (v-prediction models, SD 2.x 768)."""
    if prediction_type == EPSILON:
        return noise
    if prediction_type == V_PREDICTION:
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def sd_loss(pred_uncond: torch.Tensor, pred_cond: torch.Tensor, target: torch.Tensor,
            guidance: float) -> torch.Tensor:
    """MSE between the classifier-free-guided prediction and the target."""
    guided = pred_uncond.float() + guidance * (pred_cond.float() - pred_uncond.float())
    return F.mse_loss(guided, target.float())


@dataclass
class Losses:
    ce: torch.Tensor
    mse: torch.Tensor
    sd: torch.Tensor
    total: torch.Tensor

    def numbers(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("ce", "mse", "sd", "total")}


def combine(ce: torch.Tensor, mse: torch.Tensor, sd: torch.Tensor, was_weight: float,
            sd_weight: float) -> Losses:
    return Losses(ce, mse, sd, ce + was_weight * mse + sd_weight * sd)
