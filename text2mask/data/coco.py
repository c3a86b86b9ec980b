"""MS COCO 2014: image-level labels and ground-truth masks from the instance annotations.

Layout under ``--data-root`` (``images_dir`` and ``annotations`` override the first two)::

    train2014/, val2014/                     the images (COCO_<split>2014_<12-digit id>.jpg)
    annotations/instances_<split>2014.json   instance annotations
    SegmentationClass/<split>2014/<id>.png   ground-truth cache, rendered once by build_gt

Classes are 1..80 in category-id order (the id gaps closed), 0 = background. The category
list is read from the annotation file and must match the class set's names in that order.

Policies:

- Image-level labels: every category with at least one annotation in the image, crowd
  included — as in the usual COCO WSSS label files: the class is in the photo, so the
  prompt must name it. An image without annotations gets no labels (all-background mask).
- Ground truth: non-crowd instances are painted in order of decreasing pixel area (ties:
  lower annotation id first), so a smaller object lying on a larger one (a racket in a
  hand, a cat on a bed) stays visible. Pixels of a crowd region that no non-crowd instance
  covers are 255 (ignored by evaluation): a crowd mask mixes its class with the
  background between the members, so it is neither right nor wrong there.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from ..io import read_json, write_index_png
from ..log import progress as progress_bar
from ..classes import ClassSet, load_class_set
from .base import Dataset, DatasetError, Sample

SPLITS = ("train", "val")
YEAR = "2014"


@dataclass
class CocoDataset(Dataset):
    # The annotations are re-read when ground truth must be rendered rather than kept:
    # train2014's take gigabytes in memory for the whole run.
    annotations: Path | None = None
    gt_cache: Path | None = None                 # where build_gt writes by default
    cat_ids: tuple[int, ...] = ()                # COCO category id of class 1..n
    image_ids: dict[str, int] = field(default_factory=dict, repr=False)  # sample id -> image id


def default_gt_dir(root: str | Path, split: str) -> Path:
    return Path(root) / "SegmentationClass" / f"{split}{YEAR}"


def _split(split: str) -> str:
    name = split[:-len(YEAR)] if split.endswith(YEAR) else split
    if name not in SPLITS:
        raise DatasetError(f"unknown COCO split {split!r}; use one of {', '.join(SPLITS)}")
    return name


def read_annotations(path: str | Path) -> COCO:
    """pycocotools COCO index of an instances file; DatasetError naming it if unusable."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: COCO annotation file not found")
    doc = read_json(path, "COCO annotation file", DatasetError)
    missing = [k for k in ("images", "annotations", "categories")
               if not isinstance(doc, dict) or not isinstance(doc.get(k), list)]
    if missing:
        raise DatasetError(f"{path}: not a COCO instances file (no {', '.join(missing)} list)")
    _check_entries(doc, path)
    coco = COCO()
    coco.dataset = doc
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
            coco.createIndex()
    except (KeyError, TypeError) as e:
        raise DatasetError(f"{path}: malformed COCO annotation file ({type(e).__name__}: {e})") from None
    return coco


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_entries(doc: dict, path: Path) -> None:
    """Every field the labels and the ground-truth rendering read, checked up front so
    that a bad entry is one message naming it, not a traceback halfway through."""
    for c in doc["categories"]:
        if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str):
            raise DatasetError(f"{path}: category {_show(c)} needs an integer 'id' and a 'name' string")
    sizes: dict[int, tuple[int, int]] = {}
    for im in doc["images"]:
        if not isinstance(im, dict) or not _is_int(im.get("id")) or not isinstance(im.get("file_name"), str):
            raise DatasetError(f"{path}: image {_show(im)} needs an integer 'id' and a 'file_name' string")
        h, w = im.get("height"), im.get("width")
        if not (_is_int(h) and _is_int(w) and h > 0 and w > 0):
            raise DatasetError(f"{path}: image {im['id']} ({im['file_name']}): height and width must be positive "
                               f"integers, got height={h!r}, width={w!r}")
        sizes[im["id"]] = (h, w)
    for a in doc["annotations"]:
        if not isinstance(a, dict) or not all(_is_int(a.get(k)) for k in ("id", "image_id", "category_id")):
            raise DatasetError(f"{path}: annotation {_show(a)} needs integer 'id', 'image_id' and 'category_id'")
        where = f"{path}: annotation {a['id']} (image {a['image_id']})"
        if a["image_id"] not in sizes:
            raise DatasetError(f"{where}: no image with that id in the file")
        problem = _segmentation_problem(a.get("segmentation"), sizes[a["image_id"]])
        if problem:
            raise DatasetError(f"{where}: {problem}")


def _show(entry) -> str:
    text = json.dumps(entry)
    return text if len(text) <= 80 else text[:77] + "..."


def _segmentation_problem(seg, size: tuple[int, int]) -> str | None:
    """Why ``seg`` is no valid COCO segmentation of an image of ``size`` (h, w), or None.
    Polygons: lists of x, y numbers, at least 3 points. RLE: ``size`` [h, w] equal to the
    image's and ``counts`` (a list, or COCO's compressed string) covering h * w pixels."""
    if seg is None:
        return "no 'segmentation'"
    if isinstance(seg, list):
        for poly in seg:
            if not (isinstance(poly, list) and all(_is_number(v) for v in poly)):
                return f"a polygon must be a list of numbers, got {_show(poly)}"
            if len(poly) < 6 or len(poly) % 2:
                return f"a polygon needs x, y pairs of at least 3 points, got {len(poly)} number(s)"
        return None
    if not isinstance(seg, dict):
        return f"'segmentation' must be polygons or an RLE object, got {_show(seg)}"
    if list(seg.get("size", ())) != list(size):
        return f"RLE size {seg.get('size')!r} differs from the image's [height, width] {list(size)}"
    counts = seg.get("counts")
    if isinstance(counts, str):
        counts = _rle_counts(counts)
        if counts is None:
            return "RLE 'counts' is not a valid compressed COCO RLE string"
    elif not (isinstance(counts, list) and all(_is_int(c) for c in counts)):
        return "RLE 'counts' must be a list of integers or a compressed COCO RLE string"
    if any(c < 0 for c in counts) or sum(counts) != size[0] * size[1]:
        return f"RLE runs cover {sum(counts)} pixels, not the image's {size[0]} x {size[1]} = {size[0] * size[1]}"
    return None


def _rle_counts(text: str) -> list[int] | None:
    """Run lengths of a compressed COCO RLE string (pycocotools' rleFrString: 5-bit
    groups in characters from '0', a continuation bit, sign extension, runs after the
    second coded as differences), or None if the string is malformed."""
    counts: list[int] = []
    chars, p = text.encode("ascii", "replace"), 0
    while p < len(chars):
        x, k, more = 0, 0, True
        while more:
            if p >= len(chars):
                return None
            c = chars[p] - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def category_ids(coco: COCO, class_set: ClassSet, path: Path) -> tuple[int, ...]:
    """Category ids sorted by id, checked name by name against the class set's order."""
    cats = sorted(coco.dataset["categories"], key=lambda c: c["id"])
    if len(cats) != len(class_set.classes):
        raise DatasetError(f"{path}: {len(cats)} categories, but class set '{class_set.name}' "
                           f"has {len(class_set.classes)} classes")
    for i, c in enumerate(cats, start=1):
        try:
            ok = class_set.index_of(c["name"]) == i
        except KeyError:
            ok = False
        if not ok:
            raise DatasetError(f"{path}: category id {c['id']} {c['name']!r} (number {i} by id) does "
                               f"not match class {i} {class_set.spec(i).name!r} of class set '{class_set.name}'")
    return tuple(c["id"] for c in cats)


def render_gt(coco: COCO, img_id: int, cat_to_index: dict[int, int]) -> np.ndarray:
    """Semantic mask (H, W) uint8 of one image under the module's overlap and crowd policy."""
    info = coco.imgs[img_id]
    out = np.zeros((info["height"], info["width"]), dtype=np.uint8)
    crowd = np.zeros(out.shape, dtype=bool)
    things = []
    for a in coco.imgToAnns.get(img_id, []):
        m = coco.annToMask(a).astype(bool)
        if a.get("iscrowd", 0):
            crowd |= m
        else:
            things.append((-int(m.sum()), a["id"], m, cat_to_index[a["category_id"]]))
    things.sort(key=lambda t: t[:2])
    for _, _, m, k in things:
        out[m] = k
    out[crowd & (out == 0)] = 255
    return out


def _listing(folder: Path) -> set[str]:
    # One directory listing instead of one stat per image (train2014 has 82,783).
    return set(os.listdir(folder)) if folder.is_dir() else set()


def build_gt(dataset: CocoDataset, out_dir: str | Path | None = None, progress: bool = False) -> Path:
    """Write `<out_dir>/<id>.png` for every image that has none yet (default out_dir:
    ``dataset.gt_cache``); existing files are kept as they are. Returns out_dir."""
    out = Path(out_dir) if out_dir is not None else dataset.gt_cache
    if out is None:
        raise DatasetError("no folder for the COCO ground truth; pass out_dir")
    have = _listing(out)
    todo = [s for s in dataset.samples if f"{s.id}.png" not in have]
    if not todo:
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"{out}: cannot create the ground-truth folder ({e}); choose another one") from None
    coco = read_annotations(dataset.annotations)
    cat_to_index = {c: i for i, c in enumerate(dataset.cat_ids, start=1)}
    for s in progress_bar(todo, enabled=progress, desc="COCO ground truth", unit="img"):
        write_index_png(out / f"{s.id}.png", render_gt(coco, dataset.image_ids[s.id], cat_to_index))
    return out


def ensure_gt(dataset: CocoDataset, out_dir: str | Path | None = None, progress: bool = False) -> CocoDataset:
    """Build the missing ground truth and point the dataset and its samples at it."""
    out = build_gt(dataset, out_dir, progress)
    dataset.gt_dir = dataset.gt_cache = out
    dataset.samples = [replace(s, gt=out / f"{s.id}.png") for s in dataset.samples]
    return dataset


def load_coco(root: str | Path, split: str = "train", images_dir: str | Path | None = None,
              annotations: str | Path | None = None, class_set: ClassSet | str = "coco",
              gt_dir: str | Path | None = None) -> CocoDataset:
    """COCO 2014 samples ordered by image id, with labels; ``gt_dir`` overrides the cache
    folder (default ``<root>/SegmentationClass/<split>2014``), used if it exists."""
    split = _split(split)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"COCO data root {root} does not exist")
    images = Path(images_dir).expanduser() if images_dir is not None else root / f"{split}{YEAR}"
    if not images.is_dir():
        raise DatasetError(f"COCO image folder {images} does not exist")
    ann_path = (Path(annotations).expanduser() if annotations is not None
                else root / "annotations" / f"instances_{split}{YEAR}.json")
    if not ann_path.is_file():
        raise DatasetError(f"{ann_path}: COCO annotation file not found")
    cs = load_class_set(class_set) if isinstance(class_set, (str, Path)) else class_set

    coco = read_annotations(ann_path)
    cat_ids = category_ids(coco, cs, ann_path)
    cat_to_index = {c: i for i, c in enumerate(cat_ids, start=1)}
    unknown = sorted({a["category_id"] for a in coco.anns.values()} - set(cat_to_index))
    if unknown:
        raise DatasetError(f"{ann_path}: annotations use category id(s) {unknown} missing from its category list")
    if not coco.imgs:
        raise DatasetError(f"{ann_path}: lists no images")

    cache = Path(gt_dir).expanduser() if gt_dir is not None else default_gt_dir(root, split)
    cached = _listing(cache)
    present = _listing(images)
    samples, image_ids, unlabeled, absent = [], {}, 0, []
    for img_id in sorted(coco.imgs):
        info = coco.imgs[img_id]
        sid = Path(info["file_name"]).stem
        if sid in image_ids:
            raise DatasetError(f"{ann_path}: images {image_ids[sid]} and {img_id} share the file stem {sid!r}")
        image_ids[sid] = img_id
        classes = tuple(sorted({cat_to_index[a["category_id"]] for a in coco.imgToAnns.get(img_id, [])}))
        unlabeled += not classes
        if info["file_name"] not in present:
            absent.append(info["file_name"])
        gt = cache / f"{sid}.png" if f"{sid}.png" in cached else None
        samples.append(Sample(sid, images / info["file_name"], classes, gt))

    notes = []
    if unlabeled:
        notes.append(f"{unlabeled} image(s) have no annotations; their masks will be all background")
    if absent:
        notes.append(f"{len(absent)} of {len(samples)} annotated image(s) are not in {images} (first: {absent[0]})")
    return CocoDataset("coco", split, cs, samples, f"instance annotations ({Path(ann_path).absolute()})",
                       cache if cache.is_dir() else None, notes,
                       annotations=ann_path, gt_cache=cache, cat_ids=cat_ids, image_ids=image_ids)
