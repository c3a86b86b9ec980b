"""Pictures for people: coloured masks, the uncertainty view (paper Fig. 4), a comparison
strip per image, an HTML page over a run's outputs and a per-class IoU bar chart.

Everything is drawn with PIL from arrays; only ``visualize_run`` and ``iou_bar_chart``
touch files. One palette serves VOC, COCO and custom class sets alike: the standard
PASCAL VOC palette (class bits interleaved into R, G, B), whose 256 entries are all
distinct. Index 255 (unsure / void) keeps that palette's own entry, the off-white
(224, 224, 192) VOC uses for void boundaries.
"""
from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .classes import IGNORE_INDEX as UNSURE
from .errors import ConfigError, InputError
from .io import IMAGE_SUFFIXES, read_image, read_index_png, write_png, write_text
from .log import get, progress
from .wsss.refine import TRAINING_MASK_CONFIDENCE
from .wsss.result import UNCERTAIN_GAP, uncertain_pixels

log = get(__name__)
UNCERTAIN_TITLE = f"uncertain: top-2 score gap < {UNCERTAIN_GAP:g}"

PAD = 4
SWATCH = 12
_FONT = ImageFont.load_default()
_MEASURE = ImageDraw.Draw(Image.new("RGB", (1, 1)))
LINE = max(_MEASURE.textbbox((0, 0), "Ag", font=_FONT)[3], SWATCH)
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


def _text_width(text: str) -> int:
    return int(np.ceil(_MEASURE.textlength(text, font=_FONT)))


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


def uncertainty_map(scores: np.ndarray) -> np.ndarray:
    """Paper Fig. 4: white where the top two scores differ by less than 0.05."""
    return binary_map(uncertain_pixels(scores))


def legend(classes: Sequence[int], names: Sequence[str], width: int | None = None) -> Image.Image:
    """White strip of colour swatches with class names, wrapped into rows of ``width``
    pixels (default: one row). ``names[k]`` names class k; 255 is "unsure / void"."""
    items = [(int(k), class_name(int(k), names)) for k in classes]
    sizes = [SWATCH + PAD + _text_width(name) + 3 * PAD for _, name in items]
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
            draw.text((x + SWATCH + PAD, y), name, fill="black", font=_FONT)
    return img


def caption(text: str, width: int) -> Image.Image:
    # Drawn on its own tile so a long title is clipped at its column, not spilled over.
    tile = Image.new("RGB", (width, CAPTION_HEIGHT), "white")
    ImageDraw.Draw(tile).text((max((width - _text_width(text)) // 2, PAD), PAD), text, fill="black", font=_FONT)
    return tile


def strip(photo: np.ndarray | Image.Image, initial: np.ndarray, crf: np.ndarray | None,
          gt: np.ndarray | None, uncertain: np.ndarray | None, names: Sequence[str],
          uncertain_title: str = UNCERTAIN_TITLE) -> Image.Image:
    """photo | initial labels | CRF labels | ground truth | uncertainty, each at the
    photo's size, column titles under them and a legend of the classes present below.

    ``crf``, ``gt`` and ``uncertain`` (a boolean (h, w) mask drawn white) may be None;
    their columns are then left out.
    """
    rgb = np.asarray(photo.convert("RGB")) if isinstance(photo, Image.Image) else np.asarray(photo, np.uint8)
    h, w = rgb.shape[:2]
    labelled = [("initial", initial), ("CRF", crf), ("ground truth", gt)]
    panels = [("photo", rgb)] + [(t, colorize(a)) for t, a in labelled if a is not None]
    if uncertain is not None:
        panels.append((uncertain_title, binary_map(uncertain)))
    for title, a in panels:
        if a.shape[:2] != (h, w):
            raise ValueError(f"{title} is {a.shape[1]}x{a.shape[0]} but the photo is {w}x{h}")
    present = np.unique(np.concatenate([np.unique(a) for _, a in labelled if a is not None]))
    return titled_row(panels, present.tolist(), names)


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


def _find_photo(images: Path, key: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        for name in (key + suffix, key + suffix.upper()):
            if (images / name).is_file():
                return images / name
    raise InputError(f"{images}: no photo for id {key!r} ({', '.join(IMAGE_SUFFIXES)})")


@dataclass
class RunRecord:
    """What ``visualize_run`` reads from a run's ``run.json``; relative paths are taken
    relative to the run folder."""

    names: list[str]
    confidence: float
    image_dir: Path | None
    gt_dirs: list[Path]


def _read_run_json(run_dir: Path):
    path = Path(run_dir) / "run.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{run_dir}: no run.json; pass the --out folder of a text2mask run") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None


def run_method(run_dir: str | os.PathLike) -> str:
    """Which method made a run folder: run.json's ``method`` (wsss, refer, slime, fewshot)."""
    doc = _read_run_json(Path(run_dir))
    method = doc.get("method") if isinstance(doc, dict) else None
    return method if isinstance(method, str) else "wsss"


def read_run_record(run_dir: Path) -> RunRecord:
    """run.json of a ``generate`` run folder; an InputError naming the file and the
    field when it is missing, not JSON, or holds a field of the wrong type."""
    path = run_dir / "run.json"
    doc = _read_run_json(run_dir)

    def field_of(obj: dict, key: str, kind, where: str, default):
        value = obj.get(key)
        if value is None:
            return default
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InputError(f"{path}: field {where} should be {_KINDS[kind]}, got {json.dumps(value)[:60]}")
        return value

    if not isinstance(doc, dict):
        raise InputError(f"{path}: expected a JSON object, got {json.dumps(doc)[:60]}")
    dataset = field_of(doc, "dataset", dict, "dataset", {})
    fingerprint = field_of(doc, "fingerprint", dict, "fingerprint", {})
    class_set = field_of(fingerprint, "class_set", dict, "fingerprint.class_set", {})
    names = ["background"]
    for i, c in enumerate(field_of(class_set, "classes", list, "fingerprint.class_set.classes", [])):
        where = f"fingerprint.class_set.classes[{i}]"
        names.append(field_of(c if isinstance(c, dict) else {"name": c}, "name", str, f"{where}.name", str(i + 1)))
    method = field_of(fingerprint, "method", dict, "fingerprint.method", {})
    confidence = field_of(method, "confidence", (int, float), "fingerprint.method.confidence",
                          TRAINING_MASK_CONFIDENCE)
    image_dir = field_of(dataset, "image_dir", str, "dataset.image_dir", None)
    gt_dirs = field_of(dataset, "gt_dirs", list, "dataset.gt_dirs", None)
    if gt_dirs is None:
        gt_dir = field_of(dataset, "gt_dir", str, "dataset.gt_dir", None)
        gt_dirs = [gt_dir] if gt_dir else []
    elif not all(isinstance(d, str) for d in gt_dirs):
        raise InputError(f"{path}: field dataset.gt_dirs should be a list of folder paths")
    return RunRecord(names, float(confidence), run_dir / image_dir if image_dir else None,
                     [run_dir / d for d in gt_dirs])  # an absolute path stays as it is under "/"


_KINDS = {dict: "an object", list: "a list", str: "a string", (int, float): "a number"}


@dataclass
class Pages:
    """What ``visualize_run`` wrote: ``index`` (index.html), the ids ``shown`` (one strip
    each) and the ids ``skipped`` with the reason (a missing photo, an unreadable mask)."""

    index: Path
    shown: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _find_gt(gt_dirs: list[Path], key: str) -> Path | None:
    return next((d / f"{key}.png" for d in gt_dirs if (d / f"{key}.png").is_file()), None)


def _check_targets(out: Path, targets: list[Path], inputs: list[Path]) -> None:
    """Refuse, before writing anything, an --out that is a file or whose outputs would
    replace one of the files they are drawn from."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file, not a folder")
    read = {p.resolve() for p in inputs if p.exists()}
    clash = [t for t in targets if t.resolve() in read]
    if clash:
        raise ConfigError(f"--out {out}: writing {clash[0].name} there would replace the input file {clash[0]}; "
                          "choose another output folder")


def visualize_run(run_dir: str | os.PathLike, n: int = 16, out: str | os.PathLike | None = None,
                  images: str | os.PathLike | None = None, gt: str | os.PathLike | None = None) -> Pages:
    """Strips for the first ``n`` ids (sorted) with a ``masks/<id>.png`` in a run folder of
    ``text2mask generate``, written as ``<out>/<id>.png`` (default out: ``<run>/vis``)
    with an ``index.html`` listing them.

    Photos come from ``images`` or else run.json's ``dataset.image_dir``; ground truth
    from ``gt`` or else run.json's ``dataset.gt_dirs`` (or ``gt_dir``), looked up per id;
    relative paths in run.json are relative to the run folder. Class names come from
    the run's fingerprint. An id whose photo is missing (or whose files cannot be read)
    is skipped with a warning and listed on the page; the others are still drawn.

    The uncertainty column differs from ``strip``'s default: a run does not store the
    score maps, so the paper's top-2 gap cannot be recomputed. It shows instead the
    pixels that are 255 in ``masks/<id>.png``, i.e. CRF confidence below the run's
    threshold (0.95 by default), and its column title says so. Runs made with
    ``--no-crf`` have neither CRF labels nor unsure pixels; both columns are left out.
    """
    run_dir = Path(run_dir)
    record = read_run_record(run_dir)
    image_dir = Path(images) if images is not None else record.image_dir
    if image_dir is None:
        raise InputError(f"{run_dir / 'run.json'} does not record the image folder; pass --images DIR")
    if not image_dir.is_dir():
        raise InputError(f"photo folder {image_dir} not found"
                         + ("" if images is not None else " (recorded in run.json); pass --images DIR"))
    gt_dirs = [Path(gt)] if gt is not None else record.gt_dirs
    if gt is not None and not Path(gt).is_dir():
        raise InputError(f"--gt {gt}: ground-truth folder not found")
    lost = [d for d in gt_dirs if not d.is_dir()]
    if lost:
        log.warning(f"ground-truth folder {lost[0]} (recorded in run.json) not found; "
                    "strips without ground truth (pass --gt DIR)")
        gt_dirs = [d for d in gt_dirs if d.is_dir()]
    ids = sorted(p.stem for p in (run_dir / "masks").glob("*.png"))[:n]
    if not ids:
        raise InputError(f"{run_dir / 'masks'}: no masks to show")

    out = Path(out) if out is not None else run_dir / "vis"
    inputs = [image_dir / f"{k}{s}" for k in ids for s in IMAGE_SUFFIXES]
    inputs += [run_dir / f / f"{k}.png" for k in ids for f in ("masks", "initial", "crf")]
    inputs += [d / f"{k}.png" for k in ids for d in gt_dirs]
    _check_targets(out, [out / f"{k}.png" for k in ids] + [out / "index.html"], inputs)

    pages = Pages(out / "index.html")
    title_unsure = f"unsure: CRF confidence < {record.confidence:g}"
    for key in progress(ids, desc="visualize", unit="img"):
        try:
            photo = read_image(_find_photo(image_dir, key))
            crf_path = run_dir / "crf" / f"{key}.png"
            crf = read_index_png(crf_path) if crf_path.is_file() else None
            unsure = read_index_png(run_dir / "masks" / f"{key}.png") == UNSURE if crf is not None else None
            gt_path = _find_gt(gt_dirs, key)
            gt_mask = read_index_png(gt_path) if gt_path is not None else None
            img = strip(photo, read_index_png(run_dir / "initial" / f"{key}.png"), crf, gt_mask, unsure,
                        record.names, uncertain_title=title_unsure)
        except (InputError, ValueError) as e:
            log.warning(f"{key}: skipped ({e})")
            pages.skipped[key] = str(e)
            continue
        write_png(out / f"{key}.png", img)
        pages.shown.append(key)
    without_gt = [k for k in pages.shown if _find_gt(gt_dirs, k) is None]
    if gt_dirs and without_gt:
        log.warning(f"{len(without_gt)} of {len(pages.shown)} image(s) have no ground truth in "
                    f"{', '.join(map(str, gt_dirs))} (first: {without_gt[0]})")
    write_text(pages.index, _page(run_dir, pages, record.confidence))
    return pages


def _page(run_dir: Path, pages: Pages, confidence: float) -> str:
    title = html.escape(f"text2mask run {run_dir.resolve().name}: first {len(pages.shown) + len(pages.skipped)} images")
    figures = "\n".join(
        f'<figure><figcaption>{html.escape(k)}</figcaption><img src="{quote(k)}.png" alt="{html.escape(k)}"></figure>'
        for k in pages.shown)
    skipped = "".join(f"<li>{html.escape(k)}: {html.escape(why)}</li>" for k, why in pages.skipped.items())
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>\n"
            "<style>img{max-width:100%}figure{margin:0 0 1.5em}</style></head>\n"
            f"<body><h1>{title}</h1>\n<p>Columns: photo | initial | CRF | ground truth (if any) | "
            f"unsure (CRF confidence &lt; {confidence:g}, white).</p>\n{figures}\n"
            + (f"<h2>Skipped</h2>\n<ul>{skipped}</ul>\n" if skipped else "")
            + "</body></html>\n")


def iou_bar_chart(result: dict, path: str | os.PathLike) -> Path:
    """Horizontal per-class IoU bars (a result of ``evaluate_dirs``, in percent) as a PNG, in the
    classes' palette colours; classes absent from the ground truth are left out.
    Size: (CHART_WIDTH, CHART_TOP + BAR_ROW * classes + PAD)."""
    rows = [c for c in result["per_class"] if c["IoU"] is not None]
    miou = result.get("mIoU")
    title = f"mIoU {'-' if miou is None else f'{miou:.1f}'}% over {len(rows)} classes"
    name_w = max([_text_width(c["name"]) for c in rows] + [0]) + 2 * PAD
    value_w = _text_width("100.0") + 2 * PAD
    bar_w = max(CHART_WIDTH - name_w - value_w - PAD, 1)
    img = Image.new("RGB", (CHART_WIDTH, CHART_TOP + BAR_ROW * len(rows) + PAD), "white")
    draw = ImageDraw.Draw(img)
    draw.text((PAD, PAD), title, fill="black", font=_FONT)
    for i, c in enumerate(rows):
        y = CHART_TOP + i * BAR_ROW
        draw.text((name_w - PAD - _text_width(c["name"]), y), c["name"], fill="black", font=_FONT)
        draw.rectangle([name_w, y, name_w + bar_w, y + LINE - 1], fill=(240, 240, 240))  # the 100% extent
        end = name_w + round(c["IoU"] / 100 * bar_w)
        if end > name_w:
            draw.rectangle([name_w, y, end - 1, y + LINE - 1], fill=tuple(int(v) for v in PALETTE[c["index"]]),
                           outline=(96, 96, 96))
        draw.text((name_w + bar_w + PAD, y), f"{c['IoU']:.1f}", fill="black", font=_FONT)
    path = Path(path)
    write_png(path, img)
    return path
