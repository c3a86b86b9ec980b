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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..classes import load_class_set
from ..errors import DatasetError, InputError
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
    protocol = rows[0][1]["protocol"]
    if protocol.get("manifest_version") != MANIFEST_VERSION or protocol.get("benchmark") not in BENCHMARKS:
        raise InputError(f"{path}: unsupported manifest (version {protocol.get('manifest_version')!r}, "
                         f"benchmark {protocol.get('benchmark')!r})")
    episodes, seen = [], set()
    for n, row in rows[1:]:
        try:
            e = Episode(str(row["id"]), int(row["class"]), str(row["query"]), tuple(str(s) for s in row["supports"]))
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}:{n}: expected {{id, class, query, supports}}, got {row!r}") from None
        if e.id in seen:
            raise InputError(f"{path}:{n}: episode id {e.id!r} repeats")
        if not e.supports or e.query in e.supports:
            raise InputError(f"{path}:{n}: episode {e.id!r} needs supports other than its query")
        seen.add(e.id)
        episodes.append(e)
    if not episodes:
        raise InputError(f"{path}: the manifest lists no episodes")
    return Manifest(protocol, tuple(episodes))


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
