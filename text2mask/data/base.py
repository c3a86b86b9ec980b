"""What every dataset source hands the runner: samples with image-level labels."""
from __future__ import annotations

from dataclasses import dataclass, field
import os
from pathlib import Path, PurePosixPath
from typing import Callable

from ..errors import DatasetError, InputError
from ..io import IMAGE_SUFFIXES
from ..classes import ClassSet


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path
    classes: tuple[int, ...] | None   # image-level labels 1..n (may be empty); None = read lazily
    gt: Path | None = None            # ground-truth index PNG, if any


@dataclass
class Dataset:
    name: str                         # voc, coco, folder
    split: str
    class_set: ClassSet
    samples: list[Sample]
    label_source: str                 # where the image-level labels came from
    gt_dir: Path | None = None        # the preferred ground-truth folder; per image: Sample.gt
    notes: list[str] = field(default_factory=list)   # warnings worth showing the user
    # Reads a sample's labels when they were not known up front (e.g. from its GT mask),
    # so that one unreadable file fails that image only.
    label_reader: Callable[[Sample], tuple[int, ...]] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def gt_dirs(self) -> list[Path]:
        """The folders holding the samples' ground truth, in first-use order (VOC's may
        lie in SegmentationClassAug/ and SegmentationClass/)."""
        return list(dict.fromkeys(s.gt.parent for s in self.samples if s.gt is not None))

    def labels(self, sample: Sample) -> tuple[int, ...]:
        if sample.classes is not None:
            return sample.classes
        if self.label_reader is None:
            raise DatasetError(f"no labels for image {sample.id!r}")
        return self.label_reader(sample)




def read_split_file(path: str | os.PathLike, notes: list[str] | None = None) -> list[str]:
    """Image ids from a split file: plain ids or DeepLab-style `<image> <mask>` lines.

    Order is kept and blank lines skipped. A repeated id is kept once (it would otherwise
    be processed and counted twice); ``notes`` receives a line saying so."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # Windows editors start a file with a BOM
    except FileNotFoundError:
        raise InputError(f"{path}: split file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read split file ({e})") from None
    ids: dict[str, None] = {}
    dups = []
    for line in text.splitlines():
        tokens = line.split()
        if not tokens:
            continue
        name = PurePosixPath(tokens[0]).name
        # Strip only image suffixes: a bare id may itself contain a dot.
        stem, suffix = os.path.splitext(name)
        key = stem if suffix.lower() in IMAGE_SUFFIXES else name
        if key in ids:
            dups.append(key)
        ids.setdefault(key)
    if dups and notes is not None:
        notes.append(f"{path}: {len(dups)} duplicate id(s) ignored (first: {dups[0]})")
    return list(ids)
