"""COCO 2014 source on the 4 real val2014 photos and annotations of samples/coco-mini."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from text2mask.errors import DatasetError
from text2mask.data.coco import build_gt, ensure_gt, load_coco, render_gt
from text2mask.io import read_index_png
from text2mask.classes import load_class_set

MINI = Path(__file__).resolve().parent.parent / "samples" / "coco-mini"
ANN = MINI / "annotations" / "instances_mini.json"
CS = load_class_set("coco")

# pycocotools 2.0.x under numpy 2 warns on every mask decode; nothing to act on here.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _id(n: int) -> str:
    return f"COCO_val2014_{n:012d}"


def make_tree(root: Path, doc: dict | None = None) -> Path:
    shutil.copytree(MINI / "images", root / "val2014")
    (root / "annotations").mkdir()
    target = root / "annotations" / "instances_val2014.json"
    if doc is None:
        shutil.copy(ANN, target)
    else:
        target.write_text(json.dumps(doc))
    return root


@pytest.fixture
def coco_root(tmp_path):
    return make_tree(tmp_path / "coco")


def expected_mask(coco: COCO, img_id: int) -> np.ndarray:
    """The documented policy restated per pixel: a pixel takes the class of the smallest
    non-crowd instance covering it (equal areas: the higher annotation id); 255 if only a
    crowd region covers it; 0 otherwise."""
    info = coco.imgs[img_id]
    anns = coco.imgToAnns[img_id]
    cat_index = {c: i for i, c in enumerate(sorted(coco.getCatIds()), start=1)}
    things = [a for a in anns if not a["iscrowd"]]
    out = np.zeros((info["height"], info["width"]), dtype=np.int64)
    if things:
        stack = np.stack([coco.annToMask(a).astype(bool) for a in things])
        areas = stack.sum(axis=(1, 2))
        # Rank instances by (area ascending, id descending): rank 0 wins a pixel.
        order = sorted(range(len(things)), key=lambda j: (areas[j], -things[j]["id"]))
        rank = np.empty(len(things), dtype=np.int64)
        rank[order] = np.arange(len(things))
        cost = np.where(stack, rank[:, None, None], len(things))
        winner = cost.argmin(axis=0)
        covered = stack.any(axis=0)
        classes = np.array([cat_index[a["category_id"]] for a in things])
        out[covered] = classes[winner[covered]]
    for a in anns:
        if a["iscrowd"]:
            out[(coco.annToMask(a) > 0) & (out == 0)] = 255
    return out


def counts(a: np.ndarray) -> dict[int, int]:
    v, c = np.unique(a, return_counts=True)
    return dict(zip(v.tolist(), c.tolist()))


def test_labels_per_image(coco_root):
    ds = load_coco(coco_root, "val")
    assert ds.name == "coco" and ds.split == "val" and len(ds) == 4
    got = {s.id: s.classes for s in ds.samples}
    idx = CS.index_of
    assert got == {
        _id(42): (idx("dog"),),
        _id(885): tuple(sorted((idx("person"), idx("tennis racket")))),
        _id(1000): tuple(sorted(idx(n) for n in ("person", "tennis racket", "handbag", "backpack"))),
        _id(39769): tuple(sorted(idx(n) for n in ("cat", "remote", "couch", "bed"))),
    }
    # The same, as indices 1..80 in category-id order (ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 unused).
    assert got[_id(1000)] == (1, 25, 27, 39) and got[_id(39769)] == (16, 58, 60, 66) and got[_id(42)] == (17,)
    assert [s.id for s in ds.samples] == [_id(n) for n in (42, 885, 1000, 39769)]  # by image id
    assert all(s.image == coco_root / "val2014" / f"{s.id}.jpg" and s.image.is_file() for s in ds.samples)
    assert ds.gt_dir is None and all(s.gt is None for s in ds.samples)
    assert ds.notes == []


def test_image_without_annotations_gets_no_labels(tmp_path):
    doc = json.loads(ANN.read_text())
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != 42]
    ds = load_coco(make_tree(tmp_path, doc), "val2014")
    assert ds.samples[0].id == _id(42) and ds.samples[0].classes == ()
    assert any("1 image(s) have no annotations" in n for n in ds.notes)
    out = ensure_gt(ds)
    assert counts(read_index_png(out.samples[0].gt)) == {0: 640 * 478}


@pytest.mark.parametrize("img_id", [42, 1000, 39769])
def test_gt_pixel_counts_follow_policy(coco_root, img_id):
    coco = COCO(str(ANN))
    cat_index = {c: i for i, c in enumerate(sorted(coco.getCatIds()), start=1)}
    got = render_gt(coco, img_id, cat_index)
    want = expected_mask(coco, img_id)
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert counts(got) == counts(want)
    np.testing.assert_array_equal(got, want)
    # Pinned as well, so a change in pycocotools' rasterisation shows up here.
    assert counts(got) == PINNED[img_id]


PINNED = {
    42: {0: 252433, 17: 53487},
    1000: {0: 180910, 1: 118234, 25: 1079, 27: 4500, 39: 2477},
    39769: {0: 3779, 16: 112933, 58: 174579, 60: 9723, 66: 6186},
}


def test_gt_smaller_object_stays_on_top():
    coco = COCO(str(ANN))
    cat_index = {c: i for i, c in enumerate(sorted(coco.getCatIds()), start=1)}
    got = render_gt(coco, 42, cat_index)
    dog = coco.annToMask(coco.imgToAnns[42][0]).astype(bool)
    assert counts(got) == {0: 640 * 478 - int(dog.sum()), 17: int(dog.sum())}
    # 39769: cats (index 16) lie on the couch (58) and bed (60), remotes (66) on the cats.
    got = render_gt(coco, 39769, cat_index)
    anns = coco.imgToAnns[39769]

    def union(cat_ids):
        return np.any([coco.annToMask(a) > 0 for a in anns if a["category_id"] in cat_ids], axis=0)

    cats, furniture, remotes = union((17,)), union((63, 65)), union((75,))
    assert (cats & furniture).sum() > 10000 and (remotes & cats).sum() > 0
    assert (got[cats & ~remotes] == 16).all()
    assert (got[remotes] == 66).all()


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO crowd format: run lengths over the column-major pixels, starting with zeros."""
    flat = mask.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0] + runs
    return {"counts": runs, "size": list(mask.shape)}


def test_crowd_is_255_where_not_covered(tmp_path):
    doc = json.loads(ANN.read_text())
    h, w = 478, 640
    rect = np.zeros((h, w), dtype=np.uint8)
    rect[100:300, 50:400] = 1
    doc["annotations"].append({"id": 900000001, "image_id": 42, "category_id": 1, "iscrowd": 1,
                               "segmentation": _uncompressed_rle(rect), "area": int(rect.sum()),
                               "bbox": [50, 100, 350, 200]})
    root = make_tree(tmp_path, doc)
    ds = load_coco(root, "val")
    assert ds.samples[0].classes == (1, 17)  # the crowd-only person counts as a label
    ensure_gt(ds)
    got = read_index_png(ds.samples[0].gt)

    coco = COCO(str(root / "annotations" / "instances_val2014.json"))
    dog = coco.annToMask(next(a for a in coco.imgToAnns[42] if not a["iscrowd"])).astype(bool)
    crowd = rect.astype(bool)
    assert 0 < (dog & crowd).sum() < crowd.sum()  # the test needs a partial overlap
    assert (got[crowd & ~dog] == 255).all()
    assert (got[dog] == 17).all()
    assert (got[~crowd & ~dog] == 0).all()
    assert counts(got) == {0: int((~crowd & ~dog).sum()), 17: int(dog.sum()), 255: int((crowd & ~dog).sum())}
    np.testing.assert_array_equal(got, expected_mask(coco, 42))


def test_gt_cache_built_once(coco_root):
    ds = load_coco(coco_root, "val")
    out = build_gt(ds)
    assert out == coco_root / "SegmentationClass" / "val2014"
    files = sorted(out.glob("*.png"))
    assert [p.stem for p in files] == [s.id for s in ds.samples]
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    assert build_gt(ds) == out
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes

    # A removed mask is rebuilt, the others are left alone.
    files[1].unlink()
    build_gt(ds)
    assert files[1].is_file()
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in files if p != files[1])

    # A fresh load finds the cache.
    again = load_coco(coco_root, "val")
    assert again.gt_dir == out
    assert [s.gt for s in again.samples] == files


def test_ensure_gt_custom_folder(coco_root, tmp_path):
    ds = load_coco(coco_root, "val", gt_dir=tmp_path / "gt")
    assert ds.gt_dir is None
    ensure_gt(ds)
    assert ds.gt_dir == tmp_path / "gt"
    assert all(s.gt == tmp_path / "gt" / f"{s.id}.png" and s.gt.is_file() for s in ds.samples)
    assert not (coco_root / "SegmentationClass").exists()


def test_explicit_paths(tmp_path):
    ds = load_coco(tmp_path, "val", images_dir=MINI / "images", annotations=ANN)
    assert len(ds) == 4 and ds.samples[0].image == MINI / "images" / f"{_id(42)}.jpg"


def test_missing_image_is_kept_with_a_note(coco_root):
    (coco_root / "val2014" / f"{_id(885)}.jpg").unlink()
    ds = load_coco(coco_root, "val")
    assert len(ds) == 4 and not ds.samples[1].image.exists()
    assert any("1 of 4 annotated image(s) are not in" in n for n in ds.notes)


def test_errors(coco_root, tmp_path):
    with pytest.raises(DatasetError, match="unknown COCO split 'test'"):
        load_coco(coco_root, "test")
    with pytest.raises(DatasetError, match=r"instances_train2014\.json: COCO annotation file not found"):
        (coco_root / "train2014").mkdir()
        load_coco(coco_root, "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="COCO image folder .*val2014 does not exist"):
        load_coco(tmp_path / "empty", "val")
    with pytest.raises(DatasetError, match="COCO data root .* does not exist"):
        load_coco(tmp_path / "nowhere", "val")

    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"bad\.json: cannot read COCO annotation file"):
        load_coco(coco_root, "val", annotations=bad)
    bad.write_text('{"images": []}')
    with pytest.raises(DatasetError, match=r"not a COCO instances file \(no annotations, categories list\)"):
        load_coco(coco_root, "val", annotations=bad)
    with pytest.raises(DatasetError, match="80 categories, but class set 'voc' has 20 classes"):
        load_coco(coco_root, "val", class_set="voc")

    swapped = json.loads(Path(CS.source).read_text())
    c = swapped["classes"]
    c[0], c[1] = c[1], c[0]
    (tmp_path / "swapped.json").write_text(json.dumps(swapped))
    with pytest.raises(DatasetError, match="category id 1 'person' .* class 1 'bicycle'"):
        load_coco(coco_root, "val", class_set=tmp_path / "swapped.json")
