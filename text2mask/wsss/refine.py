"""Dense-CRF refinement of per-label score maps into a pseudo mask.

The bilateral kernel compares pixel colours. The default ``"reference"`` colour
image reproduces what the reference code and the WSSS codebases the paper compares
with fed to pydensecrf: the mean-subtracted BGR network input cast back to uint8,
which wraps negative values around modulo 256 (a dark pixel and a bright one can look
alike to the CRF). It is kept as the default so the numbers are comparable.
``"rgb"`` (the plain photo) is the sane option when comparability does not matter.
"""
from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf

# ImageNet/Caffe pixel mean in B, G, R order, as used by the reference code.
BGR_MEAN = np.array([104.008, 116.669, 122.675])
CRF_IMAGES = ("reference", "rgb")
TRAINING_MASK_CONFIDENCE = 0.95  # paper §5.1: CRF confidence below it -> 255 (ignore) in the training mask  # the colour images the bilateral kernel can be given


def _check_rgb(rgb: np.ndarray) -> None:
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")


def crf_image(rgb: np.ndarray, mode: str = "reference") -> np.ndarray:
    """Colour image for the bilateral kernel: C-contiguous uint8 (H, W, 3)."""
    rgb = np.asarray(rgb)
    _check_rgb(rgb)
    if mode == "rgb":
        return np.array(rgb, order="C")  # a copy: pydensecrf rejects read-only buffers
    if mode != "reference":
        raise ValueError(f"mode must be one of {CRF_IMAGES}, got {mode!r}")
    centred = rgb[..., ::-1].astype(np.float64) - BGR_MEAN
    # The reference cast float -> uint8 in C: truncate toward zero, then wrap mod 256.
    # Spelled out because numpy leaves out-of-range float -> uint8 casts undefined.
    wrapped = np.trunc(centred).astype(np.int64) % 256
    return np.ascontiguousarray(wrapped.astype(np.uint8))


def dense_crf(scores: np.ndarray, rgb: np.ndarray, mode: str = "reference",
              iterations: int = 10) -> np.ndarray:
    """Mean-field dense CRF over score maps (C, H, W); returns Q float32 (C, H, W)."""
    scores = np.asarray(scores, dtype=np.float32)
    rgb = np.asarray(rgb)
    _check_rgb(rgb)
    if scores.ndim != 3 or scores.shape[0] < 1:
        raise ValueError(f"scores must be (C, H, W) with C >= 1, got shape {scores.shape}")
    c, h, w = scores.shape
    if (h, w) != rgb.shape[:2]:
        raise ValueError(f"scores are {h}x{w} but the image is {rgb.shape[0]}x{rgb.shape[1]}"
                         " (H x W); resize the score maps to the original image first")
    if np.isnan(scores).any():
        raise ValueError("NaN in the score maps reached the CRF; the attention stage "
                         "produced invalid values")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")

    crf = dcrf.DenseCRF2D(w, h, c)
    unary = -np.log(np.clip(scores, 1e-5, 1.0)).reshape(c, h * w)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=1, compat=3)
    crf.addPairwiseBilateral(sxy=67, srgb=3, rgbim=crf_image(rgb, mode), compat=4)
    q = np.array(crf.inference(iterations), dtype=np.float32)
    return q.reshape(c, h, w)


def _map_classes(labels: np.ndarray, classes, n_channels: int | None = None) -> np.ndarray:
    classes = np.asarray(classes)
    if classes.ndim != 1 or (n_channels is not None and len(classes) != n_channels):
        raise ValueError(f"classes must list one class index per channel "
                         f"({n_channels}), got shape {classes.shape}")
    if classes.min(initial=0) < 0 or classes.max(initial=0) > 255:
        raise ValueError("class indices must lie in 0..255")
    if labels.size and labels.max() >= len(classes):
        raise ValueError(f"channel index {labels.max()} has no entry in classes "
                         f"(length {len(classes)})")
    return classes.astype(np.uint8)[labels]


def crf_labels(q: np.ndarray, classes=None) -> tuple[np.ndarray, np.ndarray]:
    """Hard labels (uint8) and confidence (float32, max Q) from Q (C, H, W).

    Labels index the channels of ``q`` unless ``classes`` maps channel -> class index
    (e.g. [0, 12, 15]), in which case they are dataset class indices.
    """
    q = np.asarray(q)
    if q.ndim != 3 or q.shape[0] < 1:
        raise ValueError(f"q must be (C, H, W) with C >= 1, got shape {q.shape}")
    labels = q.argmax(axis=0).astype(np.uint8)
    confidence = q.max(axis=0).astype(np.float32)
    if classes is not None:
        labels = _map_classes(labels, classes, q.shape[0])
    return labels, confidence


def training_mask(labels: np.ndarray, confidence: np.ndarray, threshold: float = TRAINING_MASK_CONFIDENCE,
                  ignore: int = 255, classes=None) -> np.ndarray:
    """Labels with every pixel whose confidence is below ``threshold`` set to ``ignore``.

    Pass ``classes`` only if ``labels`` are still channel indices (not already mapped by
    ``crf_labels``).
    """
    labels = np.asarray(labels)
    confidence = np.asarray(confidence)
    if labels.shape != confidence.shape:
        raise ValueError(f"labels {labels.shape} and confidence {confidence.shape} differ in shape")
    if classes is not None and ignore in np.asarray(classes):
        raise ValueError(f"ignore value {ignore} is also a class index")
    out = labels.astype(np.uint8) if classes is None else _map_classes(labels, classes)
    return np.where(confidence < threshold, np.uint8(ignore), out)
