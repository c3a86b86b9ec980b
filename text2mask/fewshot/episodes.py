"""Stage 1 — few-shot episodes under the HSNet protocol, written once as a manifest.

An episode is (class c, query image q, supports s_1..s_K): every image shows c, the
supports never equal the query. Test episodes follow HSNet (``data/{pascal,coco}.py``),
which DiffewS copied:

- PASCAL-5i: VOC classes 1..20; fold i tests classes 5i+1..5i+5. Lists
  ``val/fold{i}.txt`` hold ``<image>__<class>`` lines (class 1-based). Episode k takes
  the query ``list[k mod len]`` and its class, then draws supports of that class.
- COCO-20i (HSNet's interleaved split): class c (1-based, category-id order) is a test
  class of fold (c - 1) mod 4. Lists ``val/fold{i}.pkl`` map a 0-based class to its
  image names. Each episode draws a class, then a query, then supports.
- Every draw is ``RandomState.choice(x, 1, replace=False)[0]`` on a NumPy legacy
  generator seeded with 0, in that order, a support equal to the query being redrawn;
  1000 episodes per fold. The draws consume the generator exactly as HSNet does, so the
  episodes are HSNet's as long as nothing else draws from its seeded stream first.

Because episodes depend on the order of random calls, they are written once to a JSONL
manifest (a header line with the protocol, then one line per episode: id, class, query,
supports); evaluation, resume and shards key on the episode id.

The list files come from the user (HSNet's are unlicensed and their build rules are
undocumented, so text2mask does not ship them).
"""
from __future__ import annotations

import hashlib
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..classes import load_class_set
from ..errors import ConfigError, DatasetError, InputError
from ..guard import safe_name
from ..io import read_image, read_index_png, write_text

FOLDS = 4
TEST_EPISODES = 1000
SEED = 0
IGNORE = 255
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Benchmark:
    """One FSS benchmark: its classes (1-based, as in its masks) and file layout."""

    name: str            # pascal5i | coco20i
    class_set: str       # bundled class set with the names in index order
    num_classes: int
    list_suffix: str     # .txt (PASCAL) or .pkl (COCO)
    ignores_255: bool    # PASCAL masks mark object boundaries 255 (ignored in scoring)
    split_note: str      # recorded in manifests: COCO-20i has several splits in circulation

    def test_classes(self, fold: int) -> tuple[int, ...]:
        check_fold(fold)
        if self.name == "pascal5i":
            per = self.num_classes // FOLDS
            return tuple(range(per * fold + 1, per * fold + per + 1))
        return tuple(c for c in range(1, self.num_classes + 1) if (c - 1) % FOLDS == fold)

    def train_classes(self, fold: int) -> tuple[int, ...]:
        test = set(self.test_classes(fold))
        return tuple(c for c in range(1, self.num_classes + 1) if c not in test)

    def class_names(self) -> list[str]:
        return load_class_set(self.class_set).names

    def list_file(self, lists: Path, split: str, fold: int) -> Path:
        return Path(lists) / split / f"fold{fold}{self.list_suffix}"

    def image_path(self, root: Path, name: str) -> Path:
        return root / "JPEGImages" / f"{name}.jpg" if self.name == "pascal5i" else root / name

    def mask_path(self, root: Path, name: str) -> Path:
        if self.name == "pascal5i":
            aug = root / "SegmentationClassAug" / f"{name}.png"
            return aug if aug.is_file() or not (root / "SegmentationClass").is_dir() else \
                root / "SegmentationClass" / f"{name}.png"
        return root / "annotations" / f"{Path(name).with_suffix('.png')}"


BENCHMARKS = {
    "pascal5i": Benchmark("pascal5i", "voc", 20, ".txt", True, "PASCAL-5i: fold i tests VOC classes 5i+1..5i+5"),
    "coco20i": Benchmark("coco20i", "coco", 80, ".pkl", False,
                         "COCO-20i interleaved (HSNet): class c tests in fold (c-1) mod 4"),
}


def benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise DatasetError(f"unknown benchmark {name!r}; use one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def check_fold(fold: int) -> int:
    if not (isinstance(fold, int) and 0 <= fold < FOLDS):
        raise DatasetError(f"unknown fold {fold!r}; the benchmarks have folds 0..{FOLDS - 1}")
    return fold


def data_root(bench: Benchmark, root: str | Path) -> Path:
    """The VOC2012 / COCO2014 folder; its parent (DiffewS' ``--datapath``) is accepted too."""
    root = Path(root).expanduser()
    inner = root / ("VOC2012" if bench.name == "pascal5i" else "COCO2014")
    if inner.is_dir():
        root = inner
    if not root.is_dir():
        raise DatasetError(f"{bench.name} data root {root} does not exist")
    return root.resolve()


# --- list files -------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageLists:
    """A split's images per class (1-based), in list-file order. ``pairs`` keeps the
    PASCAL list order that test queries walk through (empty for COCO)."""

    per_class: dict[int, tuple[str, ...]]
    pairs: tuple[tuple[str, int], ...]
    files: tuple[Path, ...]

    def digest(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            h.update(f.name.encode())
            h.update(f.read_bytes())
        return h.hexdigest()


def _missing(files: list[Path], bench: Benchmark, lists: Path) -> None:
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise DatasetError(
            f"{bench.name}: missing list file(s) {', '.join(absent)}. text2mask does not ship the benchmark "
            f"lists: pass --lists with the folder holding HSNet's {{trn,val}}/fold0..3{bench.list_suffix} "
            f"(hsnet data/splits/{'pascal' if bench.name == 'pascal5i' else 'coco'}/), looked in {lists}")


def read_pascal_list(path: Path, num_classes: int) -> list[tuple[str, int]]:
    """``<image>__<class>`` lines (class 1-based); blank lines skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read list file ({e})") from None
    pairs = []
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        name, sep, cls = line.rpartition("__")
        if not sep or not name or not cls.isdigit() or not 1 <= int(cls) <= num_classes:
            raise DatasetError(f"{path}:{n}: expected '<image id>__<class 1..{num_classes}>', got {line!r}")
        pairs.append((name, int(cls)))
    return pairs


def read_coco_list(path: Path, num_classes: int) -> dict[int, list[str]]:
    """HSNet's pickle {0-based class: [image names]} as {1-based class: names}.

    Unpickling runs code from the file: only pass list files from a source you trust."""
    try:
        with path.open("rb") as f:
            table = pickle.load(f)
    except Exception as e:  # pickle raises many types on a foreign file
        raise DatasetError(f"{path}: not a COCO-20i list pickle ({type(e).__name__}: {e})") from None
    if not isinstance(table, dict):
        raise DatasetError(f"{path}: expected a dict {{class: [image names]}}, got {type(table).__name__}")
    out = {}
    for key, names in table.items():
        if not isinstance(key, (int, np.integer)) or not 0 <= int(key) < num_classes:
            raise DatasetError(f"{path}: class key {key!r} outside 0..{num_classes - 1}")
        if not isinstance(names, (list, tuple)) or not all(isinstance(x, str) for x in names):
            raise DatasetError(f"{path}: class {key}: expected a list of image names")
        out[int(key) + 1] = list(names)
    return out


def read_lists(bench: Benchmark, lists: str | Path, split: str, fold: int) -> ImageLists:
    """A fold's test (``val``) or training (``trn``) images per class, as HSNet reads them:
    PASCAL trains fold i on the ``trn`` lists of the three other folds; COCO keeps one
    pickle per fold and split, whose training classes are those outside the fold."""
    lists = Path(lists).expanduser()
    if bench.name == "pascal5i" and split == "trn":
        folds = [f for f in range(FOLDS) if f != fold]
    else:
        folds = [fold]
    files = [bench.list_file(lists, split, f) for f in folds]
    _missing(files, bench, lists)
    per_class: dict[int, list[str]] = {}
    pairs: list[tuple[str, int]] = []
    for f in files:
        if bench.name == "pascal5i":
            got = read_pascal_list(f, bench.num_classes)
            pairs += got
            for name, c in got:
                per_class.setdefault(c, []).append(name)
        else:
            wanted = bench.test_classes(fold) if split == "val" else bench.train_classes(fold)
            for c, names in read_coco_list(f, bench.num_classes).items():
                if c in wanted:
                    per_class.setdefault(c, []).extend(names)
    return ImageLists({c: tuple(v) for c, v in per_class.items()}, tuple(pairs), tuple(files))


def check_classes(lists: ImageLists, classes: tuple[int, ...], where: str) -> None:
    """Every class must have two distinct images: HSNet's support loop never ends otherwise."""
    for c in classes:
        if len(set(lists.per_class.get(c, ()))) < 2:
            raise DatasetError(f"{where}: class {c} has {len(set(lists.per_class.get(c, ())))} distinct image(s); "
                               "an episode needs a support other than the query (at least 2)")


# --- sampling ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Episode:
    id: str
    cls: int                       # 1-based class index (the value in the masks)
    query: str                     # image name as in the lists
    supports: tuple[str, ...]

    def to_json(self) -> dict:
        return {"id": self.id, "class": self.cls, "query": self.query, "supports": list(self.supports)}


def _pick(rs, items) -> str:
    # HSNet's exact call: choice without replacement permutes the whole pool, so the
    # stream (and every later episode) depends on using this form, not rs.randint.
    return str(rs.choice(items, 1, replace=False)[0])


def draw_supports(rs, pool, query: str, shots: int) -> list[str]:
    """Redraw until ``shots`` supports differ from the query (repeats among supports allowed, as in HSNet)."""
    out: list[str] = []
    while len(out) < shots:
        s = _pick(rs, pool)
        if s != query:
            out.append(s)
    return out


def test_episodes(bench: Benchmark, lists: ImageLists, fold: int, shots: int,
                  count: int = TEST_EPISODES, seed: int = SEED) -> list[Episode]:
    """The fold's test episodes in HSNet's order (see the module docstring)."""
    if shots < 1:
        raise DatasetError(f"--shots must be at least 1, got {shots}")
    test = bench.test_classes(fold)
    rs = np.random.RandomState(seed)
    width = max(4, len(str(count - 1)))
    out = []
    if bench.name == "pascal5i":
        pairs = list(lists.pairs)
        if not pairs:
            raise DatasetError(f"{lists.files[0]}: the list is empty")
        wrong = sorted({c for _, c in pairs} - set(test))
        if wrong:
            raise DatasetError(f"{lists.files[0]}: classes {wrong} are not test classes of fold {fold} {list(test)}")
        check_classes(lists, tuple(sorted({c for _, c in pairs})), str(lists.files[0]))
        for k in range(count):
            query, c = pairs[k % len(pairs)]
            out.append(Episode(f"{k:0{width}d}", c, query,
                               tuple(draw_supports(rs, lists.per_class[c], query, shots))))
    else:
        check_classes(lists, test, str(lists.files[0]))
        class_ids = [c - 1 for c in test]  # drawn 0-based, as HSNet does
        for k in range(count):
            c = int(rs.choice(class_ids, 1, replace=False)[0]) + 1
            query = _pick(rs, lists.per_class[c])
            out.append(Episode(f"{k:0{width}d}", c, query,
                               tuple(draw_supports(rs, lists.per_class[c], query, shots))))
    return out


def training_episode(bench: Benchmark, lists: ImageLists, rng: np.random.Generator, shots: int) -> Episode:
    """One training episode: a (query, class) pair uniformly (PASCAL, as HSNet's shuffled
    list) or a class then a query (COCO), then ``shots`` supports of that class."""
    if bench.name == "pascal5i":
        query, c = lists.pairs[int(rng.integers(len(lists.pairs)))]
    else:
        classes = sorted(lists.per_class)
        c = classes[int(rng.integers(len(classes)))]
        pool = lists.per_class[c]
        query = pool[int(rng.integers(len(pool)))]
    pool = lists.per_class[c]
    supports = []
    while len(supports) < shots:
        s = pool[int(rng.integers(len(pool)))]
        if s != query:
            supports.append(s)
    return Episode("train", c, query, tuple(supports))


# --- manifest ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Manifest:
    protocol: dict                 # benchmark, fold, shots, count, seed, data_root, lists, ...
    episodes: tuple[Episode, ...]

    @property
    def benchmark(self) -> Benchmark:
        return benchmark(self.protocol["benchmark"])


def make_manifest(bench: Benchmark, root: str | Path, lists: str | Path | None, fold: int, shots: int,
                  count: int = TEST_EPISODES, seed: int = SEED, check_files: bool = True) -> Manifest:
    check_fold(fold)
    if count < 1:
        raise DatasetError(f"--count must be at least 1, got {count}")
    root = data_root(bench, root)
    lists = Path(lists).expanduser().resolve() if lists is not None else root / "splits"
    got = read_lists(bench, lists, "val", fold)
    episodes = test_episodes(bench, got, fold, shots, count, seed)
    if check_files:
        names = sorted({n for e in episodes for n in (e.query, *e.supports)})
        for n in names:
            for p in (bench.image_path(root, n), bench.mask_path(root, n)):
                if not p.is_file():
                    raise DatasetError(f"{p}: file of image {n!r} (listed in {got.files[0]}) not found")
    protocol = {
        "manifest_version": MANIFEST_VERSION,
        "benchmark": bench.name, "split": bench.split_note, "fold": fold, "shots": shots,
        "count": count, "standard": count == TEST_EPISODES and seed == SEED, "seed": seed,
        "test_classes": list(bench.test_classes(fold)),
        "data_root": str(root), "lists": str(lists),
        "list_files": [str(f) for f in got.files], "lists_sha256": got.digest(),
    }
    return Manifest(protocol, tuple(episodes))


def write_manifest(path: str | Path, manifest: Manifest) -> None:
    lines = [json.dumps({"protocol": manifest.protocol})] + [json.dumps(e.to_json()) for e in manifest.episodes]
    write_text(path, "\n".join(lines) + "\n")


def read_manifest(path: str | Path) -> Manifest:
    """The manifest at ``path``, schema-checked (exit 2 naming the file, the line and the
    field): the header's protocol fields (``check_protocol``), then every episode's id (a
    file name of the run folder: ``guard.safe_name``), class (a test class of the fold),
    query and supports (``shots`` image names inside the data root, never the query)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"{path}: episode manifest not found (make one with `text2mask fewshot episodes`)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read episode manifest ({e})") from None
    rows = []
    for n, line in enumerate(lines, start=1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not JSON ({e})") from None
    if not rows or not isinstance(rows[0][1], dict) or not isinstance(rows[0][1].get("protocol"), dict):
        raise InputError(f"{path}: the first line must be the protocol header; not an episode manifest")
    protocol = check_protocol(rows[0][1]["protocol"], f"{path}:{rows[0][0]}")
    episodes, seen = [], set()
    for n, row in rows[1:]:
        e = _episode(row, protocol, f"{path}:{n}")
        if e.id in seen:
            raise InputError(f"{path}:{n}: episode id {e.id!r} repeats")
        seen.add(e.id)
        episodes.append(e)
    if not episodes:
        raise InputError(f"{path}: the manifest lists no episodes")
    if len(episodes) != protocol["count"]:
        raise InputError(f"{path}: field 'count' of the protocol header is {protocol['count']} but the manifest "
                         f"lists {len(episodes)} episodes (use --limit to evaluate fewer)")
    return Manifest(protocol, tuple(episodes))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _need(ok: bool, where: str, name: str, value, expected: str) -> None:
    if not ok:
        raise InputError(f"{where}: field {name!r} must be {expected}, got {value!r}")


def check_protocol(protocol: dict, where: str) -> dict:
    """A manifest's protocol header (also run.json's ``episodes``), field by field."""
    p = protocol
    for key in ("manifest_version", "benchmark", "fold", "shots", "count", "seed", "standard", "test_classes",
                "data_root", "lists_sha256"):
        if key not in p:
            raise InputError(f"{where}: the protocol header lacks the field {key!r}")
    _need(p["manifest_version"] == MANIFEST_VERSION and _is_int(p["manifest_version"]), where,
          "manifest_version", p["manifest_version"], str(MANIFEST_VERSION))
    _need(p["benchmark"] in BENCHMARKS, where, "benchmark", p["benchmark"], " or ".join(BENCHMARKS))
    _need(_is_int(p["fold"]) and 0 <= p["fold"] < FOLDS, where, "fold", p["fold"], f"an integer 0..{FOLDS - 1}")
    for key in ("shots", "count"):
        _need(_is_int(p[key]) and p[key] >= 1, where, key, p[key], "an integer >= 1")
    _need(_is_int(p["seed"]), where, "seed", p["seed"], "an integer")
    _need(isinstance(p["standard"], bool), where, "standard", p["standard"], "true or false")
    test = list(benchmark(p["benchmark"]).test_classes(p["fold"]))
    _need(p["test_classes"] == test and all(_is_int(c) for c in p["test_classes"]), where, "test_classes",
          p["test_classes"], f"{test} (the test classes of {p['benchmark']} fold {p['fold']})")
    _need(isinstance(p["data_root"], str) and bool(p["data_root"]), where, "data_root", p["data_root"],
          "the data root folder (a path)")
    _need(isinstance(p["lists_sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", p["lists_sha256"]) is not None,
          where, "lists_sha256", p["lists_sha256"], "a sha256 hex digest")
    return protocol


def _image_name(value) -> bool:
    """An image name as the lists hold it: a relative path inside the data root."""
    if not isinstance(value, str) or not value or "\\" in value or "\x00" in value:
        return False
    parts = Path(value).parts
    return not Path(value).is_absolute() and ".." not in parts


def _episode(row, protocol: dict, where: str) -> Episode:
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected an episode {{id, class, query, supports}}, got {row!r}")
    for key in ("id", "class", "query", "supports"):
        if key not in row:
            raise InputError(f"{where}: the episode lacks the field {key!r}")
    _need(isinstance(row["id"], str), where, "id", row["id"], "a string")
    try:
        safe_name(row["id"], "episode id")
    except ConfigError as e:
        raise InputError(f"{where}: {e}") from None
    _need(_is_int(row["class"]) and row["class"] in protocol["test_classes"], where, "class", row["class"],
          f"a test class of the fold {protocol['test_classes']}")
    _need(_image_name(row["query"]), where, "query", row["query"], "an image name inside the data root")
    sup = row["supports"]
    _need(isinstance(sup, list) and len(sup) == protocol["shots"] and all(_image_name(s) for s in sup), where,
          "supports", sup, f"a list of {protocol['shots']} image name(s) inside the data root (the header's shots)")
    _need(row["query"] not in sup, where, "supports", sup, f"images other than the query {row['query']!r}")
    return Episode(row["id"], row["class"], row["query"], tuple(sup))


# --- reading an episode's files ---------------------------------------------------------

@dataclass(frozen=True)
class LabelledImage:
    """A photo and its binary mask for the episode's class; ``ignore`` marks pixels
    scoring skips (PASCAL's 255 boundaries; never set for COCO)."""

    name: str
    rgb: np.ndarray          # (H, W, 3) uint8
    mask: np.ndarray         # (H, W) bool, pixels of the class
    ignore: np.ndarray       # (H, W) bool


def read_labelled(bench: Benchmark, root: Path, name: str, cls: int) -> LabelledImage:
    rgb = read_image(bench.image_path(root, name))
    path = bench.mask_path(root, name)
    labels = read_index_png(path)
    if labels.shape != rgb.shape[:2]:
        raise InputError(f"{path}: mask is {labels.shape[1]}x{labels.shape[0]} but image {name!r} is "
                         f"{rgb.shape[1]}x{rgb.shape[0]}")
    ignore = labels == IGNORE if bench.ignores_255 else np.zeros(labels.shape, bool)
    return LabelledImage(name, rgb, labels == cls, ignore)
