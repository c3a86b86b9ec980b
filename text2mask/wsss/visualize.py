"""WSSS pictures: the comparison strip (photo | initial | CRF | ground truth | uncertainty,
paper Fig. 4) and ``visualize_run``, the strips and an HTML page over a generate run."""
from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

import numpy as np
from PIL import Image

from ..classes import IGNORE_INDEX as UNSURE
from ..errors import InputError
from ..io import read_image, read_index_png, write_png, write_text
from ..log import get, progress
from ..guard import Guard
from ..visualize import Pages, binary_map, colorize, find_photo, read_run_json, titled_row
from .refine import TRAINING_MASK_CONFIDENCE
from .result import UNCERTAIN_GAP, uncertain_pixels

log = get(__name__)
UNCERTAIN_TITLE = f"uncertain: top-2 score gap < {UNCERTAIN_GAP:g}"


def uncertainty_map(scores: np.ndarray) -> np.ndarray:
    """Paper Fig. 4: white where the top two scores differ by less than 0.05."""
    return binary_map(uncertain_pixels(scores))


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


@dataclass
class RunRecord:
    """What ``visualize_run`` reads from a run's ``run.json``; relative paths are taken
    relative to the run folder."""

    names: list[str]
    confidence: float
    image_dir: Path | None
    gt_dirs: list[Path]


def read_run_record(run_dir: Path) -> RunRecord:
    """run.json of a ``generate`` run folder; an InputError naming the file and the
    field when it is missing, not JSON, or holds a field of the wrong type."""
    path = run_dir / "run.json"
    doc = read_run_json(run_dir)

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


def _find_gt(gt_dirs: list[Path], key: str) -> Path | None:
    return next((d / f"{key}.png" for d in gt_dirs if (d / f"{key}.png").is_file()), None)


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
    guard = Guard()
    guard.input(image_dir, "photo folder")
    for f in ("masks", "initial", "crf"):
        guard.input(run_dir / f, f"run's {f}/ folder")
    guard.inputs(gt_dirs, "ground-truth folder")
    guard.output_folder(out)
    guard.check()

    pages = Pages(out / "index.html")
    title_unsure = f"unsure: CRF confidence < {record.confidence:g}"
    for key in progress(ids, desc="visualize", unit="img"):
        try:
            photo = read_image(find_photo(image_dir, key))
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
