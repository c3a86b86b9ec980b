"""Exports of a WSSS run folder for trainers (``text2mask export``; docs/exports.md).

    coco-rle  <out>/annotations.json   COCO-style: images, one RLE annotation per class
                                       (or per connected component) per image, categories
    mmseg     <out>/dataset.py         an mmsegmentation 1.x dataset config over the run's
              <out>/train.txt          masks/ and photos, and its split file (the ids)
    png       <out>/masks/<id>.png     the training masks as plain index PNGs
              <out>/palette/<id>.png   (--palette) the same indices with the VOC colours
              <out>/ids.txt, classes.txt
    every     <out>/export.json        what was exported from which run, and what was not

The run folder and its photos are inputs (``text2mask.guard``): the export goes to a
new or empty folder beside the run, never inside it. Which images are exported comes from
the run's records, not from the file list: an image is exported when its mask and its
record of the run's configuration exist (README, *Outputs*: that pair proves the mask is
complete). Everything else the run names (failures, images without a mask, records of
another configuration, masks without a record) is skipped and listed; the CLI then exits 1.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from . import __version__
from .classes import IGNORE_INDEX, name_key
from .errors import ConfigError, InputError
from .guard import Guard, safe_name
from .io import read_index_png, write_bytes, write_index_png, write_json, write_png, write_text
from .log import get, progress
from .runs.folder import holder_alive, read_parts
from .runs.records import RECORDS, file_digest, read_record
from .visualize import PALETTE, find_photo, read_run_json

log = get(__name__)

FORMATS = ("coco-rle", "mmseg", "png")
REGIONS = ("class", "component")   # coco-rle: one annotation per class per image, or per 8-connected blob
IGNORE = ("omit", "crowd")         # coco-rle: unsure pixels in no annotation, or one iscrowd=1 per image
UNSURE_NAME = "unsure"             # the coco-rle category of the 255 pixels under --ignore crowd (id 255)
MASKS = "masks"                    # the run's training masks (255 = unsure), the one folder exported

EXPORT_RECORD = "export.json"
COCO_FILE = "annotations.json"
MMSEG_CONFIG = "dataset.py"
MMSEG_SPLIT = "train.txt"
PNG_MASKS, PNG_PALETTE, PNG_IDS, PNG_CLASSES = "masks", "palette", "ids.txt", "classes.txt"

_DIGEST = re.compile(r"[0-9a-f]{64}")
_EIGHT_NEIGHBOURS = np.ones((3, 3), bool)


# -- what the run holds ---------------------------------------------------------------

@dataclass
class RunContents:
    """A WSSS run folder as the exporter reads it (``read_run``)."""

    run: Path
    config: str                      # the configuration digest every exported record names
    class_set: str
    names: list[str]                 # index order, background first
    image_dir: Path | None           # run.json's dataset.image_dir (one photo folder), if recorded
    random_weights: bool
    complete: dict[str, str]         # id -> recorded photo sha256, for each mask with its record
    skipped: dict[str, str] = field(default_factory=dict)  # id -> why it is not exported
    unnamed_missing: int = 0         # images run.json counts as without a mask but does not name


def _field(doc: dict, key: str, kind, path: Path, where: str, default=None):
    value = doc.get(key, default)
    if value is default and key not in doc:
        return default
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InputError(f"{path}: field {where} has the wrong type ({json.dumps(value)[:60]})")
    return value


def read_run(run: str | Path) -> RunContents:
    """The run's class names, photo folder and complete ids (a mask and a record of the
    run's configuration), and the ids it names but lacks, with why. run.json is
    schema-checked (exit 2 naming the file and field); one item's bad record only skips
    that item. A run still being written is refused."""
    run = Path(run)
    if not run.is_dir():
        raise InputError(f"--run {run}: run folder not found")
    path = run / "run.json"
    doc = read_run_json(run)
    if not isinstance(doc, dict):
        raise InputError(f"{path}: expected a JSON object")
    method = _field(doc, "method", str, path, "method", "wsss")
    if method != "wsss":
        raise ConfigError(f"{run}: a {method} run; export reads the folders of `text2mask generate` (WSSS)")
    config = _field(doc, "config", str, path, "config", "")
    if not _DIGEST.fullmatch(config):
        raise InputError(f"{path}: field config should be the 64-hex digest of the fingerprint, got {config!r}")
    fingerprint = _field(doc, "fingerprint", dict, path, "fingerprint", {})
    class_set = _field(fingerprint, "class_set", dict, path, "fingerprint.class_set", {})
    classes = _field(class_set, "classes", list, path, "fingerprint.class_set.classes", [])
    if not classes or len(classes) >= IGNORE_INDEX:
        raise InputError(f"{path}: field fingerprint.class_set.classes should list 1..{IGNORE_INDEX - 1} classes, "
                         f"got {len(classes)}")
    names = ["background"]
    for i, c in enumerate(classes):
        where = f"fingerprint.class_set.classes[{i}]"
        name = _field(c, "name", str, path, f"{where}.name", "") if isinstance(c, dict) else ""
        if not name.strip():
            raise InputError(f"{path}: field {where}.name should be a non-empty class name")
        names.append(name)
    model = _field(fingerprint, "model", dict, path, "fingerprint.model", {})
    dataset = _field(doc, "dataset", dict, path, "dataset", {})
    image_dir = _field(dataset, "image_dir", (str, type(None)), path, "dataset.image_dir", None)
    missing = _field(doc, "missing", dict, path, "missing", {})
    missing_count = _field(missing, "count", int, path, "missing.count", 0)
    missing_first = _field(missing, "first", list, path, "missing.first", [])
    if missing_count < 0 or not all(isinstance(k, str) for k in missing_first):
        raise InputError(f"{path}: field missing should hold a count >= 0 and a list of ids")

    live = [p for p in read_parts(run, config) if p.get("status") == "running" and holder_alive(run, p.get("holder"))]
    if live:
        raise ConfigError(f"{run} is being written now (part {live[0].get('part')}); export it when the run has ended")

    contents = RunContents(run, config, _field(class_set, "name", str, path, "fingerprint.class_set.name", "classes"),
                           names, run / image_dir if image_dir else None, bool(model.get("random_weights")), {})
    _read_items(contents, missing_count, missing_first)
    return contents


def _read_items(c: RunContents, missing_count: int, missing_first: list[str]) -> None:
    """Fill ``c.complete`` from records/ and masks/, ``c.skipped`` from everything else the
    folder names: failures*.jsonl, records without a mask, masks without a record, records
    of another configuration, run.json's missing ids."""
    run = c.run
    masks = {p.stem for p in (run / MASKS).glob("*.png")} if (run / MASKS).is_dir() else set()
    recorded = {p.stem for p in (run / RECORDS).glob("*.json")} if (run / RECORDS).is_dir() else set()
    without_mask = set()
    for key in sorted(recorded | masks):
        if key.startswith("."):
            continue                                   # a writer's temporary file
        rec = read_record(run, key) if key in recorded else None
        digest = (rec.get("inputs") or {}).get("photo_sha256") if isinstance(rec, dict) else None
        if key not in masks:
            without_mask.add(key)
            c.skipped[key] = "no mask: the run did not finish this image"
        elif key not in recorded:
            c.skipped[key] = f"{MASKS}/{key}.png has no record in {RECORDS}/ (not known to be of this run)"
        elif rec is None or rec.get("id") != key or not isinstance(digest, str):
            c.skipped[key] = f"{RECORDS}/{key}.json is unreadable or malformed"
        elif rec.get("config") != c.config:
            c.skipped[key] = f"{MASKS}/{key}.png was written by another configuration than run.json's"
        else:
            c.complete[safe_name(key, "image id")] = digest
    for failures in sorted(run.glob("failures*.jsonl")):
        for line in failures.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
                key, stage, error = rec["id"], rec["stage"], rec["error"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
            if stage == "evaluate" or not isinstance(key, str) or key in c.complete:
                continue                               # a metrics failure names no image
            c.skipped[key] = f"failed in the run [{stage}]: {error}"
            without_mask.add(key)
    for key in missing_first:
        if key not in c.complete:
            c.skipped.setdefault(key, "no mask: the run did not finish this image")
            without_mask.add(key)
    c.unnamed_missing = max(0, missing_count - len(without_mask))


# -- coco-rle: pure functions over one mask -------------------------------------------------

def regions(labels: np.ndarray, num_classes: int, by: str = "class", ignore: str = "omit"):
    """(category id, binary mask, iscrowd) of each annotation of one index mask: per class
    present (1..num_classes-1, in index order), either the class's whole area
    (``by="class"``) or each 8-connected component of it in raster order of its first
    pixel (``"component"``); then, with ``ignore="crowd"``, the 255 pixels as one crowd
    region of category 255. Background (0) is never an annotation."""
    from scipy import ndimage

    if by not in REGIONS or ignore not in IGNORE:
        raise ConfigError(f"regions {by!r} / ignore {ignore!r}: use one of {REGIONS} / {IGNORE}")
    present = [int(k) for k in np.unique(labels) if 0 < k < num_classes]
    for k in present:
        area = labels == k
        if by == "class":
            yield k, area, 0
            continue
        blobs, n = ndimage.label(area, structure=_EIGHT_NEIGHBOURS)
        for i in range(1, n + 1):
            yield k, blobs == i, 0
    if ignore == "crowd" and (labels == IGNORE_INDEX).any():
        yield IGNORE_INDEX, labels == IGNORE_INDEX, 1


def rle_annotation(binary: np.ndarray, ann_id: int, image_id: int, category_id: int, iscrowd: int) -> dict:
    """One COCO annotation: compressed RLE of ``binary`` (pycocotools on Fortran-ordered
    uint8, counts as text for JSON), its area and XYWH box as pycocotools computes them."""
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(binary, dtype=np.uint8))
    return {"id": ann_id, "image_id": image_id, "category_id": int(category_id),
            "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": int(mask_util.area(rle)), "bbox": [float(v) for v in mask_util.toBbox(rle)],
            "iscrowd": int(iscrowd)}


def coco_categories(names: list[str], supercategory: str, ignore: str = "omit") -> list[dict]:
    """The run's classes as COCO categories, id = class index, background left out; with
    ``ignore="crowd"`` also the unsure pixels' category (id 255)."""
    cats = [{"id": k, "name": n, "supercategory": supercategory} for k, n in enumerate(names) if k > 0]
    if ignore == "crowd":
        cats.append({"id": IGNORE_INDEX, "name": UNSURE_NAME, "supercategory": "ignore"})
    return cats


# -- mmseg: the config text -----------------------------------------------------------------

# mmseg 1.x's own VOC training pipeline (configs/_base_/datasets/pascal_voc12_aug.py).
MMSEG_CROP = (512, 512)
_MMSEG_PIPELINE = """[
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=text2mask_crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='Pad', size=text2mask_crop_size),
    dict(type='PackSegInputs'),
]"""


def mmseg_config(*, names: list[str], data_root: Path, img_dir: Path, seg_dir: Path, img_suffix: str,
                 run: Path, config: str, count: int) -> str:
    """An mmsegmentation 1.x dataset config (plain Python literals: it runs without
    mmengine). Every top-level name starts with ``text2mask_`` because mmengine refuses a
    key that two ``_base_`` files both define, and the file is meant to sit in ``_base_``
    after a full mmseg config; ``_delete_=True`` then makes
    ``train_dataloader = dict(dataset={{_base_.text2mask_train}})`` replace that config's
    train dataset instead of merging into it."""
    palette = [[int(v) for v in PALETTE[k]] for k in range(len(names))]
    return f"""# mmsegmentation 1.x dataset config written by text2mask {__version__} (`text2mask export --format mmseg`).
# Masks: {seg_dir} ({count} images listed in {MMSEG_SPLIT}); run configuration {config}.
# Use it after a full mmseg config in _base_, then take its train dataset:
#     _base_ = ['mmseg::deeplabv3plus/deeplabv3plus_r50-d8_4xb4-20k_voc12aug-512x512.py', '{data_root / MMSEG_CONFIG}']
#     train_dataloader = dict(dataset={{{{_base_.text2mask_train}}}})
# Index 0 is background (reduce_zero_label=False); 255 (unsure) is ignored by the loss.
text2mask_classes = {tuple(names)!r}
text2mask_palette = {palette!r}
text2mask_num_classes = {len(names)}
text2mask_crop_size = {MMSEG_CROP!r}
text2mask_train_pipeline = {_MMSEG_PIPELINE}
text2mask_train = dict(
    _delete_=True,
    type='BaseSegDataset',
    data_root={str(data_root)!r},
    ann_file={MMSEG_SPLIT!r},
    data_prefix=dict(img_path={str(img_dir)!r}, seg_map_path={str(seg_dir)!r}),
    img_suffix={img_suffix!r},
    seg_map_suffix='.png',
    metainfo=dict(classes=text2mask_classes, palette=text2mask_palette),
    reduce_zero_label=False,
    ignore_index={IGNORE_INDEX},
    pipeline=text2mask_train_pipeline)
"""


# -- the export -----------------------------------------------------------------------------

@dataclass
class ExportSummary:
    format: str
    out: Path
    files: list[Path]                               # the main files written (not each PNG)
    exported: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    unnamed_missing: int = 0

    @property
    def incomplete(self) -> bool:
        return bool(self.skipped or self.unnamed_missing)


def default_out(run: Path, fmt: str) -> Path:
    """``<run>-<format>`` beside the run folder (never inside it: the run is an input)."""
    run = Path(run).resolve()
    return run.with_name(f"{run.name}-{fmt}")


def export(run: str | Path, fmt: str, out: str | Path | None = None, *, regions_by: str = "class",
           ignore: str = "omit", palette: bool = False, images: str | Path | None = None,
           check_photos: bool = True, show_progress: bool = True) -> ExportSummary:
    """Export the complete images of the WSSS run folder ``run`` as ``fmt`` into ``out``
    (default ``<run>-<fmt>``, a new or empty folder). Every check comes before the first
    mask is read: options, run.json and the records, the photo folder, the guard."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if regions_by not in REGIONS:
        raise ConfigError(f"--regions {regions_by!r}: use one of {', '.join(REGIONS)}")
    if ignore not in IGNORE:
        raise ConfigError(f"--ignore {ignore!r}: use one of {', '.join(IGNORE)}")
    run = Path(run)
    contents = read_run(run)
    if fmt == "coco-rle" and ignore == "crowd" and any(name_key(n) == name_key(UNSURE_NAME) for n in contents.names):
        raise ConfigError(f"--ignore crowd: the class set already has a class named {UNSURE_NAME!r}, the name of "
                          "the unsure pixels' category; use --ignore omit")
    out = Path(out) if out is not None else default_out(run, fmt)
    uses_photos = fmt in ("coco-rle", "mmseg")
    image_dir = Path(images) if images is not None else contents.image_dir
    if uses_photos:
        if image_dir is None:
            raise ConfigError(f"{run / 'run.json'} records no single photo folder; pass --images DIR")
        if not image_dir.is_dir():
            raise InputError(f"photo folder {image_dir} not found"
                             + ("" if images is not None else " (recorded in run.json); pass --images DIR"))
    guard = Guard()
    guard.input(run, "run folder")
    if uses_photos:
        guard.input(image_dir, "photo folder")
    guard.output_folder(out)
    guard.check()
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty; an export never replaces files: "
                          "choose another --out or remove it")
    if contents.random_weights:
        log.warning("the run's model has random weights (test model): these masks are MEANINGLESS")

    summary = ExportSummary(fmt, out, [], skipped=dict(contents.skipped), unnamed_missing=contents.unnamed_missing)
    photos = _find_photos(contents, image_dir, check_photos, summary.skipped, show_progress) if uses_photos else {}
    if fmt == "mmseg":
        _one_suffix(photos)
    ids = [k for k in sorted(contents.complete) if k not in summary.skipped]

    num_classes = len(contents.names)
    coco_images, coco_annotations = [], []
    for key in progress(ids, enabled=show_progress, desc=f"export {fmt}", unit="img"):
        mask_path = run / MASKS / f"{key}.png"
        try:
            labels = read_index_png(mask_path)
            _check_mask(mask_path, labels, num_classes, photos.get(key))
        except InputError as e:
            summary.skipped[key] = str(e)
            continue
        if fmt == "coco-rle":
            image_id = len(coco_images) + 1
            coco_images.append({"id": image_id, "file_name": photos[key][0].name,
                                "height": int(labels.shape[0]), "width": int(labels.shape[1])})
            for cat, binary, crowd in regions(labels, num_classes, regions_by, ignore):
                coco_annotations.append(rle_annotation(binary, len(coco_annotations) + 1, image_id, cat, crowd))
        elif fmt == "png":
            _write_png_item(mask_path, labels, out, key, palette)
        summary.exported.append(key)

    if fmt == "coco-rle":
        doc = {"info": {"description": f"text2mask pseudo masks of {contents.run.resolve()}",
                        "version": __version__, "date_created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "image_root": str(image_dir.resolve()), "regions": regions_by, "ignore": ignore,
                        "random_weights": contents.random_weights},
               "images": coco_images, "annotations": coco_annotations,
               "categories": coco_categories(contents.names, contents.class_set, ignore)}
        summary.files.append(out / COCO_FILE)
        write_text(out / COCO_FILE, json.dumps(doc, separators=(",", ":")) + "\n")
    elif fmt == "mmseg":
        suffix = photos[summary.exported[0]][0].suffix if summary.exported else ".jpg"
        write_text(out / MMSEG_SPLIT, "".join(f"{k}\n" for k in summary.exported))
        write_text(out / MMSEG_CONFIG, mmseg_config(
            names=contents.names, data_root=out.resolve(), img_dir=image_dir.resolve(),
            seg_dir=(run / MASKS).resolve(), img_suffix=suffix, run=run.resolve(), config=contents.config,
            count=len(summary.exported)))
        summary.files += [out / MMSEG_CONFIG, out / MMSEG_SPLIT]
    else:
        write_text(out / PNG_IDS, "".join(f"{k}\n" for k in summary.exported))
        write_text(out / PNG_CLASSES, "".join(f"{n}\n" for n in contents.names))
        summary.files += [out / PNG_MASKS, out / PNG_IDS, out / PNG_CLASSES] + ([out / PNG_PALETTE] if palette else [])
    write_json(out / EXPORT_RECORD, _record(summary, contents, regions_by, ignore, palette, image_dir))
    summary.files.append(out / EXPORT_RECORD)
    return summary


def _find_photos(c: RunContents, image_dir: Path, check: bool, skipped: dict[str, str], show: bool = True) -> dict:
    """id -> (photo path, (height, width)) for each complete id; a photo not found, not
    readable, or (with ``check``) whose bytes differ from the recorded sha256 skips its id."""
    photos = {}
    for key, digest in progress(sorted(c.complete.items()), enabled=show, desc="photos", unit="img"):
        try:
            path = find_photo(image_dir, key)
            if check and file_digest(path, "photo") != digest:
                raise InputError(f"{path}: photo changed since the run (sha256 differs from "
                                 f"{RECORDS}/{key}.json); rerun the run on it")
            with Image.open(path) as im:
                w, h = im.size
        except InputError as e:
            skipped[key] = str(e)
            continue
        except OSError as e:
            skipped[key] = f"{image_dir}: cannot read the photo of {key!r} ({e})"
            continue
        photos[key] = (path, (h, w))
    return photos


def _one_suffix(photos: dict) -> None:
    """mmseg names a photo ``<id><img_suffix>``: one suffix for the whole dataset."""
    by_suffix = {}
    for key, (path, _) in photos.items():
        by_suffix.setdefault(path.suffix, key)
    if len(by_suffix) > 1:
        (s1, k1), (s2, k2) = list(by_suffix.items())[:2]
        raise ConfigError(f"--format mmseg: the photos have several suffixes ({k1}{s1}, {k2}{s2}, ...) but an "
                          "mmseg dataset has one img_suffix; convert them to one format, or use --format coco-rle")


def _check_mask(path: Path, labels: np.ndarray, num_classes: int, photo) -> None:
    bad = labels[(labels >= num_classes) & (labels != IGNORE_INDEX)]
    if bad.size:
        raise InputError(f"{path}: value {int(bad[0])} is no class of the run (0..{num_classes - 1} or "
                         f"{IGNORE_INDEX})")
    if photo is not None and labels.shape != photo[1]:
        raise InputError(f"{path}: mask is {labels.shape[1]}x{labels.shape[0]} but its photo {photo[0]} is "
                         f"{photo[1][1]}x{photo[1][0]}")


def _write_png_item(mask_path: Path, labels: np.ndarray, out: Path, key: str, palette: bool) -> None:
    """The run's mask as is when it is an 8-bit grey PNG (the writer's format: equal bytes),
    else re-encoded as one; with ``palette`` also a palette PNG of the same indices."""
    with Image.open(mask_path) as im:
        grey = im.mode == "L" and im.format == "PNG"
    if grey:
        write_bytes(out / PNG_MASKS / f"{key}.png", mask_path.read_bytes())
    else:
        write_index_png(out / PNG_MASKS / f"{key}.png", labels)
    if palette:
        img = Image.fromarray(np.ascontiguousarray(labels))   # mode L; putpalette makes it P, same indices
        img.putpalette(PALETTE.reshape(-1).tolist())
        write_png(out / PNG_PALETTE / f"{key}.png", img)


def _record(s: ExportSummary, c: RunContents, regions_by: str, ignore: str, palette: bool, image_dir) -> dict:
    options = {"regions": regions_by, "ignore": ignore} if s.format == "coco-rle" else \
        {"palette": palette} if s.format == "png" else {}
    return {"text2mask": __version__, "format": s.format, "run": str(c.run.resolve()), "config": c.config,
            "class_set": c.class_set, "classes": c.names, "random_weights": c.random_weights,
            "image_dir": str(Path(image_dir).resolve()) if image_dir is not None and s.format != "png" else None,
            "options": options, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "exported": len(s.exported), "skipped": s.skipped, "skipped_unnamed": s.unnamed_missing}
