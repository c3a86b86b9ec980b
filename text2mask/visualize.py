"""Pictures for people, shared by every method: coloured masks, overlays, legends, rows of
titled panels, the run folder's method and the checks before pictures are written, and a
per-class IoU bar chart. Each method draws its own pictures from these (WSSS strips in
``wsss/visualize.py``, refer in ``personal/visualize.py``, SLiMe in ``slime/pictures.py``,
DiffewS in ``fewshot/visual.py``).

Everything is drawn with PIL from arrays; only ``iou_bar_chart`` touches files. One palette serves VOC, COCO and custom class sets alike: the standard
PASCAL VOC palette (class bits interleaved into R, G, B), whose 256 entries are all
distinct. Index 255 (unsure / void) keeps that palette's own entry, the off-white
(224, 224, 192) VOC uses for void boundaries.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .classes import IGNORE_INDEX as UNSURE
from .errors import InputError
from .io import IMAGE_SUFFIXES, read_json, write_png
from .log import get

log = get(__name__)

PAD = 4
SWATCH = 12
FONT = ImageFont.load_default()
_MEASURE = ImageDraw.Draw(Image.new("RGB", (1, 1)))
LINE = max(_MEASURE.textbbox((0, 0), "Ag", font=FONT)[3], SWATCH)
CAPTION_HEIGHT = LINE + 2 * PAD   # the column titles under a strip's panels
LEGEND_ROW = LINE + PAD
CHART_WIDTH = 600
CHART_TOP = LINE + 3 * PAD        # the title line of the bar chart
BAR_ROW = LINE + PAD


def _voc_palette() -> np.ndarray:
    pal = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, rgb = i, [0, 0, 0]
        for bit in range(7, -1, -1):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << bit
            c >>= 3
        pal[i] = rgb
    return pal


PALETTE = _voc_palette()


def text_width(text: str) -> int:
    return int(np.ceil(_MEASURE.textlength(text, font=FONT)))


def class_name(index: int, names: Sequence[str]) -> str:
    if index == UNSURE:
        return "unsure / void"
    return names[index] if 0 <= index < len(names) else str(index)


def colorize(labels: np.ndarray) -> np.ndarray:
    """(h, w) class indices -> (h, w, 3) uint8 palette colours."""
    return PALETTE[np.asarray(labels)]


def overlay(rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Class colours blended into the photo. Background (0) pixels are left untouched,
    since its palette colour is black and would only darken the photo."""
    rgb = np.asarray(rgb, np.uint8)
    labels = np.asarray(labels)
    blend = np.rint((1 - alpha) * rgb + alpha * colorize(labels)).astype(np.uint8)
    return np.where((labels != 0)[..., None], blend, rgb)


def binary_map(mask: np.ndarray) -> np.ndarray:
    """True -> white, False -> black, as (h, w, 3) uint8."""
    return np.repeat(np.where(np.asarray(mask, bool), 255, 0).astype(np.uint8)[..., None], 3, axis=2)


def legend(classes: Sequence[int], names: Sequence[str], width: int | None = None) -> Image.Image:
    """White strip of colour swatches with class names, wrapped into rows of ``width``
    pixels (default: one row). ``names[k]`` names class k; 255 is "unsure / void"."""
    items = [(int(k), class_name(int(k), names)) for k in classes]
    sizes = [SWATCH + PAD + text_width(name) + 3 * PAD for _, name in items]
    width = width or max(PAD + sum(sizes), 1)
    rows, x = [[]], PAD
    for item, size in zip(items, sizes):
        if rows[-1] and x + size > width:
            rows.append([])
            x = PAD
        rows[-1].append((x, item))
        x += size
    img = Image.new("RGB", (width, len(rows) * LEGEND_ROW + PAD), "white")
    draw = ImageDraw.Draw(img)
    for r, row in enumerate(rows):
        y = PAD + r * LEGEND_ROW
        for x, (k, name) in row:
            top = y + (LINE - SWATCH) // 2
            draw.rectangle([x, top, x + SWATCH - 1, top + SWATCH - 1], fill=tuple(int(v) for v in PALETTE[k]),
                           outline=(128, 128, 128))
            draw.text((x + SWATCH + PAD, y), name, fill="black", font=FONT)
    return img


def caption(text: str, width: int) -> Image.Image:
    # Drawn on its own tile so a long title is clipped at its column, not spilled over.
    tile = Image.new("RGB", (width, CAPTION_HEIGHT), "white")
    ImageDraw.Draw(tile).text((max((width - text_width(text)) // 2, PAD), PAD), text, fill="black", font=FONT)
    return tile


def titled_row(panels: Sequence[tuple[str, np.ndarray]], classes: Sequence[int],
               names: Sequence[str]) -> Image.Image:
    """Equal-size (h, w, 3) panels side by side, each titled underneath, and below them a
    legend of ``classes`` wrapped to the row's width."""
    h, w = panels[0][1].shape[:2]
    leg = legend(classes, names, width=w * len(panels))
    out = Image.new("RGB", (w * len(panels), h + CAPTION_HEIGHT + leg.height), "white")
    for i, (title, a) in enumerate(panels):
        out.paste(Image.fromarray(a), (i * w, 0))
        out.paste(caption(title, w), (i * w, h))
    out.paste(leg, (0, h + CAPTION_HEIGHT))
    return out


def overlay_with_legend(rgb: np.ndarray, labels: np.ndarray, names: Sequence[str],
                        alpha: float = 0.5) -> Image.Image:
    """``overlay`` with the legend of the classes present in its top-left corner; the
    picture keeps the photo's size (a corner legend larger than the photo is clipped)."""
    img = Image.fromarray(overlay(rgb, labels, alpha))
    img.paste(legend(np.unique(labels).tolist(), names), (0, 0))
    return img


def find_photo(images: Path, key: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        for name in (key + suffix, key + suffix.upper()):
            if (images / name).is_file():
                return images / name
    raise InputError(f"{images}: no photo for id {key!r} ({', '.join(IMAGE_SUFFIXES)})")


def read_run_json(run_dir: Path):
    return read_json(Path(run_dir) / "run.json", "run record",
                     not_found=f"{run_dir}: no run.json; pass the --out folder of a text2mask run")


def run_method(run_dir: str | os.PathLike) -> str:
    """Which method made a run folder: run.json's ``method`` (wsss, refer, slime, fewshot)."""
    doc = read_run_json(Path(run_dir))
    method = doc.get("method") if isinstance(doc, dict) else None
    return method if isinstance(method, str) else "wsss"


@dataclass
class Pages:
    """What ``visualize_run`` wrote: ``index`` (index.html), the ids ``shown`` (one strip
    each) and the ids ``skipped`` with the reason (a missing photo, an unreadable mask)."""

    index: Path
    shown: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def iou_bar_chart(result: dict, path: str | os.PathLike) -> Path:
    """Horizontal per-class IoU bars (a result of ``evaluate_dirs``, in percent) as a PNG, in the
    classes' palette colours; classes absent from the ground truth are left out.
    Size: (CHART_WIDTH, CHART_TOP + BAR_ROW * classes + PAD)."""
    rows = [c for c in result["per_class"] if c["IoU"] is not None]
    miou = result.get("mIoU")
    title = f"mIoU {'-' if miou is None else f'{miou:.1f}'}% over {len(rows)} classes"
    name_w = max([text_width(c["name"]) for c in rows] + [0]) + 2 * PAD
    value_w = text_width("100.0") + 2 * PAD
    bar_w = max(CHART_WIDTH - name_w - value_w - PAD, 1)
    img = Image.new("RGB", (CHART_WIDTH, CHART_TOP + BAR_ROW * len(rows) + PAD), "white")
    draw = ImageDraw.Draw(img)
    draw.text((PAD, PAD), title, fill="black", font=FONT)
    for i, c in enumerate(rows):
        y = CHART_TOP + i * BAR_ROW
        draw.text((name_w - PAD - text_width(c["name"]), y), c["name"], fill="black", font=FONT)
        draw.rectangle([name_w, y, name_w + bar_w, y + LINE - 1], fill=(240, 240, 240))  # the 100% extent
        end = name_w + round(c["IoU"] / 100 * bar_w)
        if end > name_w:
            draw.rectangle([name_w, y, end - 1, y + LINE - 1], fill=tuple(int(v) for v in PALETTE[c["index"]]),
                           outline=(96, 96, 96))
        draw.text((name_w + bar_w + PAD, y), f"{c['IoU']:.1f}", fill="black", font=FONT)
    path = Path(path)
    write_png(path, img)
    return path
