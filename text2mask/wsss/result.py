"""The results that pass between the stages, and the refine stage applied to them.

Kept free of torch so the CRF/writer worker processes start fast and stay small.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..classes import ClassSet, check_method_parameters
from ..errors import ConfigError
from .prompts import PromptPlan
from .refine import CRF_IMAGES, TRAINING_MASK_CONFIDENCE, crf_labels, dense_crf, training_mask


@dataclass(frozen=True)
class MaskConfig:
    """Method parameters; ``None`` thresholds take the class set's defaults."""

    samples: int = 1
    timestep: int = 150
    seed: int = 0
    box_threshold: float | None = None      # 0.2 VOC / 0.5 COCO; 0 disables the box mask
    background_tau: float | None = None     # 1.0 VOC / 0.7 COCO
    background_power: float | None = None   # 2
    crf: bool = True
    crf_image: str = "reference"            # one of refine.CRF_IMAGES
    confidence: float = TRAINING_MASK_CONFIDENCE  # below -> 255 in the training mask

    def resolved(self, class_set: ClassSet) -> "MaskConfig":
        """Class-set defaults filled in, every value checked: nonsense is refused before any
        work (a NaN threshold would otherwise give an all-background or all-class run)."""
        pick = lambda v, d: d if v is None else v  # noqa: E731
        cfg = MaskConfig(**{**asdict(self),
                            "box_threshold": pick(self.box_threshold, class_set.box_threshold),
                            "background_tau": pick(self.background_tau, class_set.background_tau),
                            "background_power": pick(self.background_power, class_set.background_power)})
        if cfg.samples < 1:
            raise ConfigError("samples must be >= 1")
        if not 0 <= cfg.timestep < 1000:
            raise ConfigError("timestep must lie in 0..999")
        if cfg.crf_image not in CRF_IMAGES:
            raise ConfigError(f"crf_image must be one of {', '.join(CRF_IMAGES)}")
        check_method_parameters(cfg.box_threshold, cfg.background_tau, cfg.background_power,
                                f"class set '{class_set.name}' or --box-threshold/--bg-tau/--bg-power")
        if not (math.isfinite(cfg.confidence) and 0 <= cfg.confidence <= 1):
            raise ConfigError(f"confidence {cfg.confidence} must lie in [0, 1]")
        return cfg


@dataclass
class Attention:
    """Model-side result for one image: labels before the CRF and the CRF's input."""

    key: str
    classes: tuple[int, ...]        # (0, k1, ..., kn): class index of each score channel
    labels: np.ndarray              # (h, w) uint8 class indices
    scores: np.ndarray              # (n + 1, h, w) float32 [background, SC_k1, ...]
    plan: PromptPlan | None = None  # None for an image without labels
    full_size: tuple[int, int] | None = None  # (h, w) to write at, if the photo was shrunk


@dataclass
class MaskResult(Attention):
    crf: np.ndarray | None = None   # (h, w) uint8 labels after the CRF
    mask: np.ndarray | None = None  # (h, w) uint8 training mask, 255 = unsure

    @property
    def uncertain(self) -> np.ndarray:
        """The paper's Fig. 4 view of this image."""
        return uncertain_pixels(self.scores)


UNCERTAIN_GAP = 0.05  # ALGORITHM.md section 6


def uncertain_pixels(scores: np.ndarray) -> np.ndarray:
    """Pixels whose top two of the (n + 1, h, w) scores differ by less than 0.05; with
    one channel (background only) none is."""
    scores = np.asarray(scores)
    if scores.shape[0] < 2:
        return np.zeros(scores.shape[1:], dtype=bool)
    top2 = np.sort(scores, axis=0)[-2:]
    return (top2[1] - top2[0]) < UNCERTAIN_GAP


def background_only(key: str, height: int, width: int) -> Attention:
    """An image without labels: everything is background, with full confidence."""
    return Attention(key, (0,), np.zeros((height, width), np.uint8), np.ones((1, height, width), np.float32))


def refine(att: Attention, rgb: np.ndarray, cfg: MaskConfig) -> MaskResult:
    """Stage 4: dense CRF on the score maps; training mask with 255 where unsure."""
    if not cfg.crf:
        return MaskResult(**vars(att))
    q = dense_crf(att.scores, rgb, mode=cfg.crf_image)
    labels, confidence = crf_labels(q, classes=att.classes)
    return MaskResult(**vars(att), crf=labels, mask=training_mask(labels, confidence, threshold=cfg.confidence))


