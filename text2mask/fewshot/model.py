"""The DiffewS predictor: a loaded Stable Diffusion 2.x with the fine-tuned UNet and
conv_in_ref, turning episodes (query photos, support photos with masks) into mask scores.
The stages are those of ``fewshot.diffews``; this module holds the model I/O."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError, InputError
from ..modeling.latents import latent_sample
from .diffews import (
    RELATIVE_THRESHOLD, RESOLUTION, TEXT_CONDITIONS, DiffewsUNet, MaskScores, mask_image_uint8, mask_scores,
    mask_to_image, square_image, square_mask,
)


@dataclass(frozen=True)
class FewShotConfig:
    """What a checkpoint fixes about inference (recorded in its fewshot.json)."""

    threshold: float = RELATIVE_THRESHOLD   # τ_r, relative to the mask image's maximum
    resolution: int = RESOLUTION            # photos squashed to resolution², masks nearest
    text_condition: str = "padded"          # empty prompt padded to the tokenizer length, or not

    def __post_init__(self):
        if self.text_condition not in TEXT_CONDITIONS:
            raise ConfigError(f"unknown text condition {self.text_condition!r}; use one of {', '.join(TEXT_CONDITIONS)}")
        if not 0.0 <= self.threshold < 1.0:
            raise ConfigError(f"relative threshold {self.threshold} must lie in [0, 1)")
        if self.resolution < 8 or self.resolution % 8:
            raise ConfigError(f"resolution {self.resolution} must be a positive multiple of 8")


def empty_text(sd, mode: str) -> torch.Tensor:
    """(1, T, D) text-encoder output of the empty prompt: T = the tokenizer's length
    (77) when ``padded`` (the reference's training input), else 2 (BOS, EOS; the
    reference's evaluation input)."""
    if mode not in TEXT_CONDITIONS:
        raise ConfigError(f"unknown text condition {mode!r}; use one of {', '.join(TEXT_CONDITIONS)}")
    tok = sd.tokenizer("", padding="max_length" if mode == "padded" else "do_not_pad",
                       max_length=sd.tokenizer.model_max_length, truncation=True, return_tensors="pt")
    return sd.text_encoder(tok.input_ids.to(sd.device))[0]


def encode(sd, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """s·E(x) for (N, 3, R, R) images in [−1, 1]: the posterior mean, or a draw
    (mean + std·ε)·s from the posterior (training) when ``generator`` is given."""
    mean, std = sd.posterior(images.to(sd.device, sd.dtype))
    if generator is None:
        z = mean * sd.latent_scale
    else:
        eps = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean.device)
        z = latent_sample(mean, std, eps, sd.latent_scale)
    return z.to(sd.dtype)


def check_support(rgb: np.ndarray, mask: np.ndarray, where: str) -> None:
    """A support mask must match its photo and mark at least one pixel."""
    if mask.shape != rgb.shape[:2]:
        raise InputError(f"{where}: support mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                         f"{rgb.shape[1]}x{rgb.shape[0]}")
    if not mask.any():
        raise InputError(f"{where}: support mask is empty (no pixel of the object)")


@dataclass
class EpisodeInputs:
    """One episode at the model resolution: the query photo, the supports and their masks."""

    query: torch.Tensor            # (3, R, R) in [−1, 1]
    supports: torch.Tensor         # (k, 3, R, R) in [−1, 1]
    support_masks: torch.Tensor    # (k, R, R) bool

    @property
    def shots(self) -> int:
        return self.supports.shape[0]


def episode_inputs(query_rgb: np.ndarray, supports: Sequence[tuple[np.ndarray, np.ndarray]],
                   resolution: int) -> EpisodeInputs:
    """Photos squashed to resolution² (bilinear), masks resized nearest (HSNet)."""
    return EpisodeInputs(
        square_image(query_rgb, resolution),
        torch.stack([square_image(rgb, resolution) for rgb, _ in supports]),
        torch.stack([square_mask(m, resolution) for _, m in supports]),
    )


@dataclass
class DiffewS:
    sd: object                      # modeling.loading.StableDiffusion (SD 2.x)
    net: DiffewsUNet
    config: FewShotConfig
    info: dict = field(default_factory=dict)   # checkpoint fewshot.json and where it came from
    _text: torch.Tensor | None = None

    def text(self) -> torch.Tensor:
        if self._text is None:
            with torch.no_grad():
                self._text = empty_text(self.sd, self.config.text_condition)
        return self._text

    def latents(self, batch: Sequence[EpisodeInputs], generator: torch.Generator | None = None):
        """Stage 2 for a batch of episodes with equal shots: query latents (B, 4, h, w)
        and support inputs (B·k, 8, h, w), episode-major. One VAE call for all 2k+1 images."""
        shots = {e.shots for e in batch}
        if len(shots) != 1:
            raise ValueError(f"episodes of one batch must have equal shots, got {sorted(shots)}")
        k = shots.pop()
        images = torch.cat([torch.stack([e.query for e in batch]),
                            torch.cat([e.supports for e in batch]),
                            mask_to_image(torch.cat([e.support_masks for e in batch]))])
        z = encode(self.sd, images, generator)
        b = len(batch)
        query, support_img, support_mask = z[:b], z[b:b + b * k], z[b + b * k:]
        return query, torch.cat([support_img, support_mask], dim=1), k

    @torch.no_grad()
    def predict(self, batch: Sequence[EpisodeInputs]) -> list[MaskScores]:
        """Stages 2–5: mask scores at the model resolution, one per episode."""
        query, support, k = self.latents(batch)
        mask_latents = self.net(query, support, k, self.text())
        decoded = self.sd.vae.decode(mask_latents / self.sd.latent_scale).sample
        return mask_scores(mask_image_uint8(decoded).cpu(), self.config.threshold)

    def describe(self) -> dict:
        return {"config": asdict(self.config), **self.info}
