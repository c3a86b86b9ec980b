"""Personalized referring segmentation datasets (Mug19-style layout; PERSONALIZED.md §1).

    ROOT/dataset.json
    ROOT/concepts/<concept>/*.jpg        views of one item (training photos)
    ROOT/images/<image>.jpg              scene photos
    ROOT/masks/<image>/<instance>.png    one mask per item in the photo (nonzero = item)

dataset.json: ``class``; ``concepts`` {id: {class, series?}}; ``images`` {id: {file,
scene, instances: {instance id: mask file}, class?}} (``class`` per image is ours:
default the dataset's); ``triplets`` [{id, image, target, text, concept (default =
target), tags}]. Splits: ``all`` = concept == target; ``semantic`` / ``visual`` = those
tagged so; ``variant`` = concept != target.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, DatasetError
from ..guard import safe_name
from ..io import image_files, read_json
from ..personal.query import class_match

SPLITS = ("all", "semantic", "visual", "variant")
CONCEPT_PHOTOS = "concepts"


@dataclass(frozen=True)
class SceneImage:
    id: str
    path: Path
    scene: str
    class_name: str
    instances: dict[str, Path]      # instance id -> mask file, in the file's order


@dataclass(frozen=True)
class Triplet:
    id: str
    image: str
    target: str
    text: str
    concept: str
    tags: tuple[str, ...] = ()

    def in_split(self, split: str) -> bool:
        if split == "variant":
            return self.concept != self.target
        return self.concept == self.target and (split == "all" or split in self.tags)


@dataclass
class ReferDataset:
    root: Path
    class_name: str
    concepts: dict[str, dict]
    images: dict[str, SceneImage]
    triplets: list[Triplet]
    notes: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[Triplet]:
        if name not in SPLITS:
            raise DatasetError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        return [t for t in self.triplets if t.in_split(name)]

    def concept_class(self, concept: str) -> str:
        entry = self.concepts[concept]
        return str(entry.get("class", self.class_name)) if isinstance(entry, dict) else self.class_name

    def concept_photos(self, concept: str) -> list[Path]:
        """The training photos of ``concept``: ROOT/concepts/<concept>/*.jpg (DatasetError
        when there are none)."""
        folder = self.root / CONCEPT_PHOTOS / concept
        photos = image_files(folder) if folder.is_dir() else []
        if not photos:
            raise DatasetError(f"{self.root / 'dataset.json'}: concept {concept!r} has no photos in {folder}")
        return photos


def _id(value, what: str, where: str) -> str:
    """An id that names files (masks/<triplet>.png, <concepts>/<concept>/): through
    ``guard.safe_name``, the one rule for names taken from data."""
    if not isinstance(value, str):
        raise DatasetError(f"{where}: {what} {value!r} is not a string")
    try:
        return safe_name(value, what)
    except ConfigError as e:
        raise DatasetError(f"{where}: {e}") from None


def _load_json(path: Path) -> dict:
    doc = read_json(path, "dataset file", DatasetError,
                    not_found=f"{path}: not found (a personalized dataset root holds dataset.json)")
    if not isinstance(doc, dict):
        raise DatasetError(f"{path}: expected a JSON object")
    missing = [k for k in ("class", "concepts", "images", "triplets") if k not in doc]
    if missing:
        raise DatasetError(f"{path}: missing key(s) {', '.join(missing)}")
    return doc


def _images(root: Path, doc: dict, where: str) -> dict[str, SceneImage]:
    images = {}
    for image_id, entry in doc["images"].items():
        _id(image_id, "image id", where)
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) \
                or not isinstance(entry.get("instances"), dict) or not entry["instances"]:
            raise DatasetError(f"{where}: image {image_id!r} needs a string 'file' and a non-empty object 'instances'")
        path = root / entry["file"]
        if not path.is_file():
            raise DatasetError(f"{where}: image {image_id!r}: {path} not found")
        instances = {}
        for inst, mask in entry["instances"].items():
            _id(inst, f"instance of image {image_id!r}", where)
            if not isinstance(mask, str) or not (root / mask).is_file():
                raise DatasetError(f"{where}: image {image_id!r}, instance {inst!r}: mask {root / mask} not found")
            instances[inst] = root / mask
        images[image_id] = SceneImage(image_id, path, str(entry.get("scene", image_id)),
                                      str(entry.get("class", doc["class"])), instances)
    return images


def _triplet(entry: dict, doc: dict, images: dict[str, SceneImage], where: str) -> Triplet:
    tid = _id(entry.get("id"), "triplet id", where)
    for k in ("image", "target", "text"):
        if not isinstance(entry.get(k), str):
            raise DatasetError(f"{where}: triplet {tid!r} needs a string {k!r}")
    image = images.get(entry["image"])
    if image is None:
        raise DatasetError(f"{where}: triplet {tid!r}: unknown image {entry['image']!r}")
    if entry["target"] not in image.instances:
        raise DatasetError(f"{where}: triplet {tid!r}: target {entry['target']!r} is not an instance of image "
                           f"{image.id!r} ({', '.join(image.instances)})")
    concept = entry.get("concept", entry["target"])
    if concept not in doc["concepts"]:
        raise DatasetError(f"{where}: triplet {tid!r}: unknown concept {concept!r}")
    concept_class = str(doc["concepts"][concept].get("class", doc["class"])) \
        if isinstance(doc["concepts"][concept], dict) else doc["class"]
    if concept_class != image.class_name:
        raise DatasetError(f"{where}: triplet {tid!r}: concept {concept!r} is a {concept_class!r}, image "
                           f"{image.id!r} shows {image.class_name!r}")
    if class_match(entry["text"], image.class_name) is None:
        raise DatasetError(f"{where}: triplet {tid!r}: text {entry['text']!r} has no whole word "
                           f"{image.class_name!r} (the class word the concept's token goes before)")
    tags = entry.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise DatasetError(f"{where}: triplet {tid!r}: 'tags' must be a list of strings")
    return Triplet(tid, image.id, entry["target"], entry["text"], concept, tuple(tags))


def load_refer_dataset(root: str | Path) -> ReferDataset:
    root = Path(root)
    where = str(root / "dataset.json")
    doc = _load_json(root / "dataset.json")
    for k, kind in (("concepts", dict), ("images", dict), ("triplets", list)):
        if not isinstance(doc[k], kind):
            raise DatasetError(f"{where}: field {k!r} must be a JSON {'object' if kind is dict else 'list'}")
    if not isinstance(doc["class"], str) or not doc["class"].strip():
        raise DatasetError(f"{where}: field 'class' must be a class word")
    for concept in doc["concepts"]:
        _id(concept, "concept id", where)
    images = _images(root, doc, where)
    triplets, seen = [], set()
    for entry in doc["triplets"]:
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: every triplet must be an object")
        t = _triplet(entry, doc, images, where)
        if t.id in seen:
            raise DatasetError(f"{where}: triplet id {t.id!r} repeats")
        seen.add(t.id)
        triplets.append(t)
    return ReferDataset(root, str(doc["class"]), dict(doc["concepts"]), images, triplets)
