"""Pictures of personalized referring segmentation: per photo, the photo, its segments,
the segment chosen (af) for each query with the query's prompt, and the correlation
matrix c[i, s] (chosen cells framed). Drawn with ``text2mask.visualize``'s palette,
overlay and legend; ``visualize_refer_run`` draws a run folder's photos."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..errors import InputError
from ..io import read_image, read_index_png, write_png
from ..log import get
from ..visualize import FONT, LINE, PAD, PALETTE, text_width, legend, overlay, read_run_json

log = get(__name__)
PANEL_WIDTH = 320      # photos are drawn at this width
CELL = 44              # correlation matrix cell side


def _panel(rgb: np.ndarray, title: str) -> Image.Image:
    img = Image.fromarray(rgb)
    img = img.resize((PANEL_WIDTH, max(1, round(img.height * PANEL_WIDTH / img.width))), Image.NEAREST)
    tile = Image.new("RGB", (PANEL_WIDTH, img.height + LINE + 2 * PAD), "white")
    tile.paste(img, (0, 0))
    text = title
    while text_width(text) > PANEL_WIDTH - 2 * PAD and len(text) > 4:
        text = text[:-4] + "..."
    ImageDraw.Draw(tile).text((PAD, img.height + PAD), text, fill="black", font=FONT)
    return tile


def correlation_image(c: np.ndarray, chosen: Sequence[int]) -> Image.Image:
    """Q x K grid of c[i, s] (grey level = value, number printed); the af cell framed in
    the chosen segment's colour. Rows q1.., columns s1.."""
    q, k = c.shape
    img = Image.new("RGB", ((k + 1) * CELL, (q + 1) * CELL), "white")
    draw = ImageDraw.Draw(img)
    finite = c[np.isfinite(c)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    for s in range(k):
        draw.text(((s + 1) * CELL + PAD, PAD), f"s{s + 1}", fill=tuple(int(v) for v in PALETTE[s + 1]), font=FONT)
    for i in range(q):
        draw.text((PAD, (i + 1) * CELL + PAD), f"q{i + 1}", fill="black", font=FONT)
        for s in range(k):
            v = c[i, s]
            level = 255 - int(200 * (v - lo) / (hi - lo)) if np.isfinite(v) and hi > lo else 230
            x0, y0 = (s + 1) * CELL, (i + 1) * CELL
            draw.rectangle([x0, y0, x0 + CELL - 2, y0 + CELL - 2], fill=(level, level, level))
            draw.text((x0 + PAD, y0 + CELL // 2 - LINE // 2), f"{v:.2f}" if np.isfinite(v) else "-",
                      fill="black" if level > 120 else "white", font=FONT)
            if s + 1 == chosen[i]:
                draw.rectangle([x0, y0, x0 + CELL - 2, y0 + CELL - 2], outline=tuple(int(x) for x in PALETTE[s + 1]),
                               width=3)
    return img


def refer_picture(rgb: np.ndarray, segments: np.ndarray, chosen: Sequence[int], prompts: Sequence[str],
                  correlation: np.ndarray) -> Image.Image:
    """photo | segments | one panel per query (its chosen segment) | correlation matrix,
    with a legend of the segments below."""
    k = correlation.shape[1]
    panels = [_panel(np.asarray(rgb, np.uint8), "photo"), _panel(overlay(rgb, segments, 0.6), f"{k} segments")]
    for i, (s, p) in enumerate(zip(chosen, prompts)):
        chosen_only = np.where(segments == s, segments, 0)
        panels.append(_panel(overlay(rgb, chosen_only, 0.6), f"q{i + 1} -> s{s}: {p}"))
    matrix = correlation_image(correlation, chosen)
    key = legend(list(range(1, k + 1)), ["outside"] + [f"segment {s}" for s in range(1, k + 1)])
    width = sum(p.width for p in panels) + matrix.width + PAD * (len(panels) + 1)
    height = max(max(p.height for p in panels), matrix.height) + key.height
    canvas = Image.new("RGB", (max(width, key.width), height), "white")
    x = 0
    for p in panels + [matrix]:
        canvas.paste(p, (x, 0))
        x += p.width + PAD
    canvas.paste(key, (0, height - key.height))
    return canvas


def visualize_refer_run(run_dir: str | os.PathLike, n: int = 16, out: str | os.PathLike | None = None) -> list[Path]:
    """A picture per photo (first ``n`` by id) of a ``text2mask refer --data-root`` run,
    into ``out`` (default ``<run>/vis``). Photos are found through the run's dataset root."""
    from ..data.personal import load_refer_dataset

    run = Path(run_dir)
    manifest = read_run_json(run)
    if manifest.get("method") != "refer":
        raise InputError(f"{run}: not a refer run (method {manifest.get('method')!r})")
    dataset = load_refer_dataset(manifest["dataset"]["root"])
    out = Path(out) if out else run / "vis"
    written = []
    for scores_file in sorted((run / "scores").glob("*.json"))[:n]:
        scores = json.loads(scores_file.read_text(encoding="utf-8"))
        key = scores["image"]
        seg_path = run / "segments" / f"{key}.png"
        if key not in dataset.images or not seg_path.is_file():
            log.warning(f"{key}: no photo or segments; skipped")
            continue
        segments = read_index_png(seg_path)
        rows = scores["triplets"]
        c = np.array([r["c"] for r in rows], dtype=np.float64)
        pic = refer_picture(read_image(dataset.images[key].path), segments, [r["af"] for r in rows],
                            [f"{r['id']}: {r['prompt']}" for r in rows], c)
        write_png(out / f"{key}.png", pic)
        written.append(out / f"{key}.png")
    return written
