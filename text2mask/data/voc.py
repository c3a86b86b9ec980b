"""PASCAL VOC 2012: split lists, image-level labels, ground truth.

Layout under ``--data-root`` (the ``VOC2012`` folder)::

    JPEGImages/<id>.jpg
    ImageSets/SegmentationAug/<split>.txt   looked for first (train_aug lists live here)
    ImageSets/Segmentation/<split>.txt      then here (train, val, trainval)
    SegmentationClassAug/<id>.png           ground truth, preferred (SBD-augmented)
    SegmentationClass/<id>.png              ground truth otherwise
    Annotations/<id>.xml                    object names, for --labels-from xml

Labels come from the ground-truth masks (classes present, 0 and 255 excluded), the XML
annotations (every object), or a file: JSON ``{id: [class names or indices]}`` or the
common ``cls_labels.npy`` (a pickled dict id -> 20-dim multi-hot; ids as strings or as
IRN's integers 2007000032).
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ..io import read_index_png
from ..errors import InputError
from ..classes import ClassSet, load_class_set
from .base import Dataset, DatasetError, Sample, read_split_file

SPLITS = ("train", "train_aug", "trainval", "trainval_aug", "val")
_ALIASES = {"trainaug": "train_aug", "trainvalaug": "trainval_aug"}
LABEL_SOURCES = ("auto", "mask", "xml", "file")


def split_file(root: Path, split: str) -> Path:
    split = _ALIASES.get(split, split)
    if split not in SPLITS:
        raise DatasetError(f"unknown VOC split {split!r}; use one of {', '.join(SPLITS)} (or trainaug)")
    candidates = [root / "ImageSets" / "SegmentationAug" / f"{split}.txt",
                  root / "ImageSets" / "Segmentation" / f"{split}.txt"]
    for c in candidates:
        if c.is_file():
            return c
    raise DatasetError(f"no split list for {split!r}: looked for " + " and ".join(str(c) for c in candidates))


def gt_dir(root: Path) -> Path | None:
    for name in ("SegmentationClassAug", "SegmentationClass"):
        if (root / name).is_dir():
            return root / name
    return None


def labels_from_mask(path: Path, num_classes: int) -> tuple[int, ...]:
    values = np.unique(read_index_png(path))
    bad = [int(v) for v in values if v != 255 and v >= num_classes]
    if bad:
        raise InputError(f"{path}: ground-truth value(s) {bad} outside the class list 0..{num_classes - 1}")
    return tuple(int(v) for v in values if 0 < v < num_classes)


def labels_from_xml(path: Path, class_set: ClassSet) -> tuple[int, ...]:
    try:
        names = [o.findtext("name", "").strip() for o in ET.parse(path).getroot().iter("object")]
    except FileNotFoundError:
        raise InputError(f"{path}: annotation file not found") from None
    except ET.ParseError as e:
        raise InputError(f"{path}: malformed XML ({e})") from None
    out = set()
    for n in names:
        try:
            out.add(class_set.index_of(n))
        except KeyError:
            raise InputError(f"{path}: unknown class name {n!r}") from None
    return tuple(sorted(out))


def _voc_id(key) -> str:
    """IRN stores ids as integers (2007000032 for 2007_000032)."""
    if isinstance(key, (int, np.integer)):
        s = str(int(key))
        return f"{s[:4]}_{s[4:]}"
    return str(key)


def read_labels_file(path: Path, class_set: ClassSet) -> dict[str, tuple[int, ...]]:
    """JSON {id: [names or indices]} or cls_labels.npy {id: multi-hot over classes 1..n}."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: labels file not found")
    n = len(class_set.classes)
    out: dict[str, tuple[int, ...]] = {}
    if path.suffix == ".npy":
        try:
            table = np.load(path, allow_pickle=True).item()
        except Exception as e:
            raise DatasetError(f"{path}: not a cls_labels.npy dict ({type(e).__name__}: {e})") from None
        for key, hot in table.items():
            hot = np.asarray(hot).reshape(-1)
            if hot.size != n:
                raise DatasetError(f"{path}: labels of {key!r} have {hot.size} entries, expected {n}")
            out[_voc_id(key)] = tuple(int(i) + 1 for i in np.flatnonzero(hot > 0))
        return out
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read labels file ({e.strerror or e})") from None
    if not isinstance(table, dict):
        raise DatasetError(f"{path}: expected a JSON object {{image id: [class names]}}")
    for key, labels in table.items():
        out[str(key)] = class_indices(labels, class_set, where=f"{path}: image {key!r}")
    return out


def class_indices(labels, class_set: ClassSet, where: str) -> tuple[int, ...]:
    """``ClassSet.indices`` as a configuration error of the dataset."""
    try:
        return class_set.indices(labels, where)
    except ValueError as e:
        raise DatasetError(str(e)) from None


def load_voc(root: str | Path, split: str = "train", labels_from: str = "auto",
             labels_file: str | Path | None = None, class_set: ClassSet | str = "voc") -> Dataset:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"VOC data root {root} does not exist (pass the VOC2012 folder)")
    if (root / "VOC2012").is_dir() and not (root / "JPEGImages").is_dir():
        root = root / "VOC2012"  # accept VOCdevkit/ too
    cs = load_class_set(class_set) if isinstance(class_set, (str, Path)) else class_set
    if labels_from not in LABEL_SOURCES:
        raise DatasetError(f"unknown --labels-from {labels_from!r}; use one of {', '.join(LABEL_SOURCES)}")
    notes: list[str] = []
    listing = split_file(root, split)
    ids = read_split_file(listing, notes)
    if not ids:
        raise DatasetError(f"{listing}: split list is empty")
    gts = gt_dir(root)

    source = labels_from
    if source == "auto":
        if labels_file is not None:
            source = "file"
        elif gts is not None:
            source = "mask"
        elif (root / "Annotations").is_dir():
            source = "xml"
        else:
            raise DatasetError(f"{root}: no SegmentationClass(Aug)/ or Annotations/ to take labels from; "
                               "pass --labels-from file --labels FILE")
    if source == "mask" and gts is None:
        raise DatasetError(f"{root}: --labels-from mask needs SegmentationClassAug/ or SegmentationClass/")
    if source == "xml" and not (root / "Annotations").is_dir():
        raise DatasetError(f"{root}: --labels-from xml needs Annotations/")
    if source == "file" and labels_file is None:
        raise DatasetError("--labels-from file needs --labels FILE")
    table = read_labels_file(Path(labels_file), cs) if source == "file" else None

    samples = []
    for i in ids:
        gt = gts / f"{i}.png" if gts is not None and (gts / f"{i}.png").is_file() else None
        if source == "file":
            if i not in table:
                raise DatasetError(f"{labels_file}: no labels for image {i!r} of {listing}")
            classes = table[i]
        else:
            classes = None  # read lazily per image: a bad file fails that image only
        samples.append(Sample(i, root / "JPEGImages" / f"{i}.jpg", classes, gt))
    label_source = {"mask": f"ground-truth masks ({gts})", "xml": f"XML annotations ({root / 'Annotations'})",
                    "file": f"labels file ({labels_file})"}[source]
    return Dataset("voc", _ALIASES.get(split, split), cs, samples, label_source, gts, notes,
                   label_reader=_reader(source, root, gts, cs))


def _reader(source: str, root: Path, gts: Path | None, cs: ClassSet):
    if source == "mask":
        return lambda s: labels_from_mask(gts / f"{s.id}.png", cs.num_classes)
    if source == "xml":
        return lambda s: labels_from_xml(root / "Annotations" / f"{s.id}.xml", cs)
    return None
