"""A picture of one episode: supports (mask over the photo) | query | prediction |
ground truth, each scaled to one height, titled underneath. PIL only (writer processes)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from ..visualize import CAPTION_HEIGHT, caption, overlay

HEIGHT = 256
FOREGROUND = 1     # palette entry the masks are drawn with (VOC red)


def _panel(rgb: np.ndarray, mask: np.ndarray | None, height: int) -> Image.Image:
    img = rgb if mask is None else overlay(rgb, np.asarray(mask, np.uint8) * FOREGROUND)
    h, w = img.shape[:2]
    return Image.fromarray(img).resize((max(1, round(w * height / h)), height), Image.BILINEAR)


def episode_strip(supports: Sequence[tuple[np.ndarray, np.ndarray]], query: np.ndarray, prediction: np.ndarray,
                  gt: np.ndarray | None, class_name: str, height: int = HEIGHT,
                  banner: str | None = None) -> Image.Image:
    """The panels side by side; ``banner`` (e.g. the random-weights warning) is a line
    across the whole picture under the titles."""
    panels = [(f"support {i + 1}: {class_name}", _panel(rgb, m, height)) for i, (rgb, m) in enumerate(supports)]
    panels.append(("query", _panel(query, None, height)))
    panels.append(("prediction", _panel(query, prediction, height)))
    if gt is not None:
        panels.append(("ground truth", _panel(query, gt, height)))
    width = sum(p.width for _, p in panels)
    lines = 2 if banner else 1
    out = Image.new("RGB", (width, height + lines * CAPTION_HEIGHT), "white")
    x = 0
    for title, p in panels:
        out.paste(p, (x, 0))
        out.paste(caption(title, p.width), (x, height))
        x += p.width
    if banner:
        out.paste(caption(banner, width), (0, height + CAPTION_HEIGHT))
    return out
