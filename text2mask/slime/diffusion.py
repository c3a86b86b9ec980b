"""The model calls SLiMe shares between fit and segment: prompt rows and the latent of a
batch of images (``modeling.latents``), every draw from the caller's generator."""
from __future__ import annotations

import numpy as np
import torch

from ..modeling.latents import latent_sample

PROMPT_LENGTH = 77


def encode_prompt(sd, text: str) -> torch.Tensor:
    """(77, D) text-encoder output of ``text`` padded to 77 tokens, fp32."""
    ids = sd.tokenizer(text, padding="max_length", max_length=PROMPT_LENGTH, truncation=True,
                       return_tensors="pt").input_ids
    with torch.no_grad():
        return sd.text_encoder(ids.to(sd.device))[0][0].float()


def pixels(rgb: np.ndarray) -> torch.Tensor:
    """(3, H, W) float in [-1, 1] from RGB uint8 (H, W, 3)."""
    return torch.from_numpy(np.array(rgb, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def encode(sd, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """z0 (B, 4, h, w) fp32: a VAE posterior sample of images x (B, 3, H, W) in [-1, 1]
    (the official code samples, it does not take the mean); eps0 from ``generator``."""
    with torch.no_grad():
        mean, std = sd.posterior(x.to(sd.device, sd.dtype))
    eps0 = torch.randn(mean.shape, generator=generator).to(mean.device)
    return latent_sample(mean, std, eps0, sd.latent_scale)
