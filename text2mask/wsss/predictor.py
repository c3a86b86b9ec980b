"""The Python API: ``Text2Mask.from_pretrained(model)(image, labels)``.

Model side (one VAE encode, one text encode per distinct prompt, one conditional UNet
pass whose rows are the ensemble samples) and the pure stages of ``propagate`` and
``refine``. The CLI and the batch runner are thin shells over this class. The model is SD
1.x, 2.x or SDXL base: its family (``modeling.families``) gives the text conditioning,
the blocks read and the input size; everything after the capture is the same.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from . import propagate as P
from ..io import image_input
from ..modeling.capture import AttentionCapture
from ..modeling.families import WSSS_FAMILIES, TextCondition
from ..modeling.latents import Draws, latent_sample, q_sample
from ..modeling.kernels import compile_vae_encoder
from ..modeling.loading import DEFAULT_MODEL, StableDiffusion, load
from ..preprocess import Geometry, geometry, prepare
from ..classes import ClassSet, load_class_set
from .prompts import PromptPlan, check_class_set_fits, plan_prompts
from .result import Attention, MaskConfig, MaskResult, background_only, refine


class Text2Mask:
    def __init__(self, sd: StableDiffusion, class_set: ClassSet | str = "voc", config: MaskConfig | None = None):
        self.sd = sd
        self.class_set = load_class_set(class_set) if isinstance(class_set, (str, Path)) else class_set
        self.config = (config or MaskConfig()).resolved(self.class_set)
        check_class_set_fits(sd.tokenizer, self.class_set)
        self._text_cache: dict[str, TextCondition] = {}

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, class_set: ClassSet | str = "voc",
                        config: MaskConfig | None = None, device: str | None = None,
                        dtype: str | None = None, revision: str | None = None, config_source: str | None = None,
                        original_config: str | None = None, compile: bool = False) -> "Text2Mask":
        """``model``: hub id, diffusers folder or single .ckpt/.safetensors file (then
        ``config_source``/``original_config`` are diffusers' ``config``/``original_config``).
        ``compile``: the VAE encoder through torch.compile (``modeling.kernels``)."""
        sd = load(model, device=device, dtype=dtype, revision=revision, config=config_source,
                  original_config=original_config, families=WSSS_FAMILIES)
        return cls(compile_vae_encoder(sd) if compile else sd, class_set, config)

    @classmethod
    def from_pipe(cls, pipe, class_set: ClassSet | str = "voc", config: MaskConfig | None = None,
                  compile: bool = False) -> "Text2Mask":
        """On a diffusers pipeline already in memory: its modules are used as they are (no copy)."""
        sd = StableDiffusion.from_pipe(pipe, families=WSSS_FAMILIES)
        return cls(compile_vae_encoder(sd) if compile else sd, class_set, config)

    # -- prompts ---------------------------------------------------------------------
    def plan(self, classes: Sequence[int]) -> PromptPlan:
        return plan_prompts(self.sd.tokenizer, self.class_set, classes)

    def geometry(self, height: int, width: int) -> Geometry:
        """The UNet input of an h x w photo: the reference's resize for SD 1.x/2.x, the
        family's native long side for SDXL (``Family.wsss_side``)."""
        return geometry(height, width, self.sd.spec.wsss_side)

    def _condition(self, text: str) -> TextCondition:
        """The prompt's text conditioning, cached per prompt text."""
        if text not in self._text_cache:
            cond = self.sd.encode_prompt(text)
            if len(self._text_cache) > 4096:
                self._text_cache.clear()
            self._text_cache[text] = cond
        return self._text_cache[text]

    def _embed(self, text: str) -> torch.Tensor:
        """(77, width) token states the cross-attention reads."""
        return self._condition(text).hidden

    # -- model side ------------------------------------------------------------------
    @torch.inference_mode()
    def attend(self, items: Sequence[tuple[str, np.ndarray, PromptPlan]],
               draws: Mapping[str, Draws] | None = None) -> list[Attention]:
        """Scores and labels for images (key, rgb, plan) of the SAME padded size, in one
        VAE call and one UNet call whose rows are image x prompt x sample. ``draws`` maps an
        image key to its ``Draws``; the others take ``Draws.default(seed, key)``."""
        sd, cfg = self.sd, self.config
        geos: list[Geometry] = [self.geometry(*rgb.shape[:2]) for _, rgb, _ in items]
        padded = {(g.padded_height, g.padded_width) for g in geos}
        if len(padded) != 1:
            raise ValueError(f"attend() batches images of one padded size, got {sorted(padded)}")
        x = torch.stack([prepare(rgb, g) for (_, rgb, _), g in zip(items, geos)]).to(sd.device, sd.dtype)
        mean, std = sd.posterior(x)

        a = sd.alphas_cumprod[cfg.timestep]
        latents, texts, pooled = [], [], []
        for i, (key, _, plan) in enumerate(items):
            d = (draws or {}).get(key) or Draws.default(cfg.seed, key, mean.shape[1:], cfg.samples)
            d.check(mean.shape[1:], cfg.samples, key)
            z = latent_sample(mean[i], std[i], d.eps0.to(sd.device), sd.latent_scale)
            z_t = q_sample(z, a, d.noise.to(sd.device)).to(sd.dtype)  # (samples, 4, h, w)
            for prompt in plan.prompts:  # every prompt shares the image's noise draws
                cond = self._condition(prompt.text)
                latents.append(z_t)
                texts.append(cond.hidden.expand(cfg.samples, -1, -1))
                if cond.pooled is not None:
                    pooled.append(cond.pooled.expand(cfg.samples, -1))
        t = torch.tensor(cfg.timestep, device=sd.device)
        added = sd.added_conditions(torch.cat(pooled) if pooled else None, next(iter(padded)))
        layout = sd.spec.layout
        with AttentionCapture(sd.unet, layout.cross_blocks, layout.self_blocks) as cap:
            maps = cap.run(torch.cat(latents), t, torch.cat(texts), added)

        out, row = [], 0
        box = cfg.box_threshold if cfg.box_threshold and cfg.box_threshold > 0 else None
        for (key, _, plan), geo in zip(items, geos):
            per_sample = [[] for _ in range(cfg.samples)]
            for prompt in plan.prompts:
                for s in range(cfg.samples):
                    cross = P.class_cross([maps.cross[b][row] for b in sorted(maps.cross)], prompt.spans, maps.grid)
                    per_sample[s].append(P.propagate(maps.self_attn[row], cross, box))
                    row += 1
            self_cross = torch.stack([torch.cat(sc) for sc in per_sample]).mean(dim=0)
            scores = P.scores_with_background(self_cross, cfg.background_tau, cfg.background_power)
            labels, full = P.to_image(scores, plan.classes, geo)
            out.append(Attention(key, (0, *plan.classes), labels, full, plan))
        return out

    # -- one image, end to end -------------------------------------------------------
    def __call__(self, image: str | Path | Image.Image | np.ndarray, labels: Sequence[int | str],
                 key: str | None = None) -> MaskResult:
        key, rgb = image_input(image, key)
        classes = self.class_set.indices(labels)
        if not classes:
            att = background_only(key, *rgb.shape[:2])
        else:
            att = self.attend([(key, rgb, self.plan(classes))])[0]
        return refine(att, rgb, self.config)
