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
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ..io import read_index_png, read_json
from ..errors import InputError
from ..classes import ClassSet, load_class_set, name_key
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


GT_FOLDERS = ("SegmentationClassAug", "SegmentationClass")   # looked for in this order, per image


def gt_dir(root: Path) -> Path | None:
    """The preferred ground-truth folder that exists (per image, see ``gt_paths``)."""
    for name in GT_FOLDERS:
        if (root / name).is_dir():
            return root / name
    return None


def gt_paths(root: Path, ids: list[str]) -> dict[str, Path]:
    """Ground truth per image: ``SegmentationClassAug/<id>.png``, else
    ``SegmentationClass/<id>.png`` (a partly filled Aug folder must not drop the others)."""
    out: dict[str, Path] = {}
    for name in reversed(GT_FOLDERS):  # the preferred folder last, so it wins
        folder = root / name
        present = set(os.listdir(folder)) if folder.is_dir() else set()  # one listing, not 10k stats
        out.update({i: folder / f"{i}.png" for i in ids if f"{i}.png" in present})
    return out


def labels_from_mask(path: Path | None, num_classes: int, key: str = "") -> tuple[int, ...]:
    if path is None:
        raise InputError(f"image {key!r}: no ground-truth mask in {' or '.join(GT_FOLDERS)} to take labels from")
    values = np.unique(read_index_png(path))
    bad = [int(v) for v in values if v != 255 and v >= num_classes]
    if bad:
        raise InputError(f"{path}: ground-truth value(s) {bad} outside the class list 0..{num_classes - 1}")
    return tuple(int(v) for v in values if 0 < v < num_classes)


def check_voc_order(class_set: ClassSet) -> None:
    """VOC's masks hold fixed indices (1 aeroplane ... 20 tvmonitor): a class set used with
    them must name the same classes in the same order. DatasetError at the first mismatch."""
    voc = load_class_set("voc")
    if [name_key(n) for n in class_set.names] == [name_key(n) for n in voc.names]:
        return
    where = class_set.source or f"class set '{class_set.name}'"
    if len(class_set.classes) != len(voc.classes):
        raise DatasetError(f"{where}: {len(class_set.classes)} classes, but VOC's masks use "
                           f"{len(voc.classes)} (1 aeroplane ... 20 tvmonitor)")
    k = next(i for i in range(1, voc.num_classes) if name_key(class_set.names[i]) != name_key(voc.names[i]))
    raise DatasetError(f"{where}: class {k} is {class_set.names[k]!r}, but VOC's masks use index {k} for "
                       f"{voc.names[k]!r}; a class file used with VOC masks must keep VOC's order (as the bundled voc.json)")


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
    """JSON {id: [names or indices]} or cls_labels.npy {id: multi-hot over classes 1..n};
    anything else is a DatasetError naming the file and, where there is one, the image."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: labels file not found")
    if path.suffix == ".npy":
        return _read_cls_labels_npy(path, len(class_set.classes))
    table = read_json(path, "labels file", DatasetError)
    if not isinstance(table, dict):
        raise DatasetError(f"{path}: expected a JSON object {{image id: [class names]}}")
    out: dict[str, tuple[int, ...]] = {}
    for key, labels in table.items():
        if not isinstance(labels, (list, str)):
            raise DatasetError(f"{path}: image {key!r}: labels must be a list of class names (or one "
                               f"comma-separated string), got {json.dumps(labels)}")
        out[str(key)] = class_indices(labels, class_set, where=f"{path}: image {key!r}")
    return out


def _read_cls_labels_npy(path: Path, n: int) -> dict[str, tuple[int, ...]]:
    """The pickled dict {id: n-dim multi-hot} of the WSSS codebases (cls_labels.npy)."""
    expected = f"expected a cls_labels.npy dict {{image id: {n}-dim multi-hot}}"
    try:
        array = np.load(path, allow_pickle=True)
    except Exception as e:  # noqa: BLE001 - numpy/pickle raise many types for a foreign file
        raise DatasetError(f"{path}: cannot read ({type(e).__name__}: {e}); {expected}") from None
    table = array.item() if isinstance(array, np.ndarray) and array.ndim == 0 and array.dtype == object else None
    if not isinstance(table, dict):
        held = (f"a {array.ndim}-d {array.dtype} array" if isinstance(array, np.ndarray)
                else type(array).__name__)
        raise DatasetError(f"{path}: holds {held}; {expected}")
    out: dict[str, tuple[int, ...]] = {}
    for key, hot in table.items():
        hot = np.asarray(hot).reshape(-1)
        if hot.dtype.kind not in "biuf":
            raise DatasetError(f"{path}: labels of image {key!r} are {hot.dtype} values, not 0/1 numbers")
        if hot.size != n:
            raise DatasetError(f"{path}: labels of image {key!r} have {hot.size} entries, expected {n}")
        out[_voc_id(key)] = tuple(int(i) + 1 for i in np.flatnonzero(hot > 0))
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
    if labels_file is not None and labels_from in ("mask", "xml"):
        raise DatasetError(f"--labels {labels_file} and --labels-from {labels_from} contradict each other: "
                           "the labels would come from the "
                           f"{'ground-truth masks' if labels_from == 'mask' else 'XML annotations'}, not the file. "
                           "Drop one (--labels-from file, or auto, uses the file)")
    notes: list[str] = []
    listing = split_file(root, split)
    ids = read_split_file(listing, notes)
    if not ids:
        raise DatasetError(f"{listing}: split list is empty")
    gts = gt_dir(root)
    gt_of = gt_paths(root, ids) if gts is not None else {}

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
    if source == "mask":
        check_voc_order(cs)   # mask values are VOC's indices: the names must follow them
    elif gt_of:
        try:
            check_voc_order(cs)
        except DatasetError as e:  # labels by name are fine; scoring against VOC's indices is not
            notes.append(f"ground truth not used for evaluation: {e}")
            gts, gt_of = None, {}
    table = read_labels_file(Path(labels_file), cs) if source == "file" else None

    samples = []
    for i in ids:
        if source == "file":
            if i not in table:
                raise DatasetError(f"{labels_file}: no labels for image {i!r} of {listing}")
            classes = table[i]
        else:
            classes = None  # read lazily per image: a bad file fails that image only
        samples.append(Sample(i, root / "JPEGImages" / f"{i}.jpg", classes, gt_of.get(i)))
    if gts is not None and len(gt_of) < len(ids):
        absent = [i for i in ids if i not in gt_of]
        notes.append(f"{len(absent)} of {len(ids)} image(s) have no ground truth in {' or '.join(GT_FOLDERS)} "
                     f"and are left out of the evaluation (first: {absent[0]})")
    # Absolute paths: run.json must stay readable from any directory.
    label_source = {"mask": f"ground-truth masks ({gts and gts.absolute()})",
                    "xml": f"XML annotations ({(root / 'Annotations').absolute()})",
                    "file": f"labels file ({labels_file and Path(labels_file).absolute()})"}[source]
    return Dataset("voc", _ALIASES.get(split, split), cs, samples, label_source, gts, notes,
                   label_reader=_reader(source, root, cs))


def _reader(source: str, root: Path, cs: ClassSet):
    if source == "mask":
        return lambda s: labels_from_mask(s.gt, cs.num_classes, s.id)
    if source == "xml":
        return lambda s: labels_from_xml(root / "Annotations" / f"{s.id}.xml", cs)
    return None
