"""The user's own images: a folder of photos plus a labels file naming each one's classes.

Labels file (keys are file names or stems; classes are names, or indices 1..n, of the
class set, a JSON file in the format of ``prompts/voc.json``):

- JSON: ``{"img1.jpg": ["dog", "person"], "img2": "cat; sofa"}``.
- CSV (``.csv``, ``.tsv``, ``.txt``), one row per image, the spreadsheet form:
  ``img1.jpg,dog;person`` — file in the first column, its labels in the second separated
  by ``;``. Also accepted: the labels in one quoted cell separated by commas
  (``img1.jpg,"dog,person"``), one label per further column (``img1.jpg,dog,person``),
  and ``;``- or tab-separated files as some spreadsheet locales write them (the first
  separator on the first line decides). An optional header row is recognised by its
  first cell (file, filename, image, ...). A row with no labels: none of the classes.

Images in the folder that the labels file does not list are left out, with a note. A
listed image missing from the folder stays in the dataset and fails on its own when run.
"""
from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath

from ..classes import ClassSet, load_class_set
from ..io import IMAGE_SUFFIXES, image_files
from .base import Dataset, DatasetError, Sample
from .voc import class_indices, read_labels_file

CSV_SUFFIXES = {".csv", ".tsv", ".txt"}
_HEADER_WORDS = {"file", "files", "filename", "image", "images", "imageid", "imagename",
                 "id", "name", "path", "filepath"}


def read_csv_labels(path: Path, class_set: ClassSet) -> dict[str, tuple[int, ...]]:
    """CSV rows `file,labels` -> {file: class indices}, in file order."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # Excel writes a byte-order mark
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read labels file ({e})") from None
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    # File names rarely hold a separator, so the first one after the name is the delimiter.
    delimiter = next((ch for ch in first if ch in "\t;,"), ",")
    out: dict[str, tuple[int, ...]] = {}
    try:
        rows = list(csv.reader(lines, delimiter=delimiter))
    except csv.Error as e:
        raise DatasetError(f"{path}: malformed CSV ({e})") from None
    header_done = False
    for lineno, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if not header_done:
            header_done = True
            if cells[0].lower().replace(" ", "").replace("_", "") in _HEADER_WORDS:
                continue
        key = cells[0]
        if not key:
            raise DatasetError(f"{path}, line {lineno}: no file name in the first column")
        if key in out:
            raise DatasetError(f"{path}, line {lineno}: image {key!r} is listed twice")
        out[key] = class_indices(",".join(cells[1:]), class_set, where=f"{path}, line {lineno}: image {key!r}")
    return out


def _image_files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in image_files(folder)}


def load_folder(images_dir: str | Path, labels_file: str | Path, class_set: ClassSet | str | Path) -> Dataset:
    """Samples in labels-file order, ids = file stems."""
    images_dir, labels_file = Path(images_dir).expanduser(), Path(labels_file).expanduser()
    if not images_dir.is_dir():
        raise DatasetError(f"image folder {images_dir} does not exist")
    if not labels_file.is_file():
        raise DatasetError(f"{labels_file}: labels file not found")
    try:
        cs = load_class_set(class_set) if isinstance(class_set, (str, Path)) else class_set
    except ValueError as e:
        raise DatasetError(str(e)) from None
    if labels_file.suffix.lower() in CSV_SUFFIXES:
        table = read_csv_labels(labels_file, cs)
    else:
        table = read_labels_file(labels_file, cs)
    if not table:
        raise DatasetError(f"{labels_file}: lists no images")

    files = _image_files(images_dir)
    by_stem: dict[str, list[str]] = {}
    for name in files:
        by_stem.setdefault(Path(name).stem, []).append(name)

    samples, owner, missing = [], {}, []
    for key, classes in table.items():
        # Spreadsheets often hold paths, Windows ones too; the folder is given.
        name = PurePosixPath(key.replace("\\", "/")).name
        if name not in files and len(by_stem.get(name, ())) > 1:
            raise DatasetError(f"{labels_file}: image {key!r} is ambiguous: "
                               f"{' and '.join(by_stem[name])} in {images_dir} share that stem")
        name = name if name in files else by_stem.get(name, [name])[0]
        sid = Path(name).stem if Path(name).suffix.lower() in IMAGE_SUFFIXES else name
        if sid in owner:
            raise DatasetError(f"{labels_file}: images {owner[sid]!r} and {key!r} have the same stem "
                               f"{sid!r} (masks are named by stem); rename one")
        owner[sid] = key
        if name not in files:
            missing.append(name)
        samples.append(Sample(sid, images_dir / name, classes))

    notes = []
    unlabeled = sorted(set(files) - {s.image.name for s in samples})
    if unlabeled:
        notes.append(f"{len(unlabeled)} image(s) in {images_dir} have no labels in {labels_file} "
                     f"and are left out (first: {unlabeled[0]})")
    if missing:
        notes.append(f"{len(missing)} listed image(s) are not in {images_dir} (first: {missing[0]})")
    return Dataset("folder", "all", cs, samples, f"labels file ({labels_file.absolute()})", None, notes)
