"""The Python API: ``Slime.fit(sd, examples, classes)`` and ``Slime.load(path, sd)(image)``.

    from text2mask.modeling.loading import load
    from text2mask.slime import Slime
    from text2mask.slime.examples import read_examples

    sd = load("stabilityai/stable-diffusion-2-1-base", device="cuda", dtype="fp32")
    classes = ["background", "body", "light", "plate", "wheel", "window"]
    slime = Slime.fit(sd, read_examples(["car.png"], ["car.npy"], classes), classes)
    slime.save("car.slime")
    result = Slime.load("car.slime", sd)("other_car.jpg")   # .labels (h, w), .scores (K, S, S)
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..io import image_input
from ..modeling.latents import image_seed
from . import segment as S
from .artifact import SlimeParts, check_model, fitted_on, load_parts, save_parts
from .fit import Example, FitSettings, fit, history_document


@dataclass
class SlimeResult:
    key: str
    classes: list[str]
    labels: np.ndarray        # (h, w) uint8 at the photo's size, values 0..K-1
    scores: np.ndarray        # (K, S, S) float32 merged rescaled WAS maps on the canvas
    valid: tuple[int, int]    # (rows, cols) of the canvas the photo covers


class Slime:
    def __init__(self, sd, parts: SlimeParts, settings: S.SegmentSettings | None = None, seed: int | None = None):
        check_model(parts, sd)
        self.sd, self.parts = sd, parts
        self.settings = (settings or parts.segment_settings()).check()
        self.seed = parts.seed if seed is None else seed
        self.cond = parts.cond.to(sd.device)
        self.history: dict | None = None   # set by ``fit``

    @property
    def classes(self) -> list[str]:
        return self.parts.classes

    @classmethod
    def fit(cls, sd, examples: Sequence[Example], classes: Sequence[str], settings: FitSettings | None = None,
            validation: Example | Sequence[Example] | None = None, checkpoint: str | os.PathLike | None = None,
            progress: bool = True, restart: bool = False) -> "Slime":
        """Fit the parts (``fit.fit``); the result's ``history`` holds the per-epoch losses
        and validation mIoU (``fit.history_document``)."""
        settings = settings or FitSettings()
        res = fit(sd, examples, classes, settings, validation, checkpoint, progress, restart=restart)
        parts = SlimeParts(list(classes), res.cond.cpu(), res.uncond.cpu(), fitted_on(sd),
                           settings.to_dict(), settings.seed, res.best_epoch, res.validation_iou)
        slime = cls(sd, parts, settings.segment)
        where = ("none (last epoch kept)" if settings.select == "last" else
                 "the validation pairs" if validation else "the training pairs, unaugmented")
        slime.history = history_document(res, classes, settings, where)
        return slime

    @classmethod
    def load(cls, path: str | os.PathLike, sd, settings: S.SegmentSettings | None = None,
             seed: int | None = None) -> "Slime":
        return cls(sd, load_parts(path), settings, seed)

    def save(self, path: str | os.PathLike) -> Path:
        return save_parts(self.parts, path)

    def with_settings(self, **changes) -> "Slime":
        return Slime(self.sd, self.parts, replace(self.settings, **changes), self.seed)

    def canvases(self, rgbs: Sequence[np.ndarray]) -> list[S.Canvas]:
        s = self.settings
        return [S.to_canvas(rgb, s.canvas, s.keep_aspect, s.bgr) for rgb in rgbs]

    def segment(self, items: Sequence[tuple[str, np.ndarray]]) -> list[SlimeResult]:
        """(key, RGB) photos -> results; one UNet call for all their tiles. Each photo's
        draws come from (seed, key): masks do not depend on the batching."""
        canvases = self.canvases([rgb for _, rgb in items])
        gens = [torch.Generator().manual_seed(image_seed(self.seed, key)) for key, _ in items]
        scores = S.canvas_scores(self.sd, self.cond, len(self.classes), [c.x for c in canvases],
                                 self.settings, gens)
        return [SlimeResult(key, self.classes, S.labels_at(sc, c.valid, rgb.shape[:2]).numpy(),
                            sc.numpy(), c.valid)
                for (key, rgb), c, sc in zip(items, canvases, scores)]

    def __call__(self, image: str | Path | Image.Image | np.ndarray, key: str | None = None) -> SlimeResult:
        return self.segment([image_input(image, key)])[0]

    def describe(self) -> dict:
        return {"classes": self.classes, "segment": asdict(self.settings), "seed": self.seed,
                "fitted_on": self.parts.model, "best_epoch": self.parts.best_epoch,
                "validation_iou": self.parts.validation_iou}
