"""`text2mask export` (issue 24 item 2): a real tiny-model WSSS run exported as COCO RLE,
an mmsegmentation config and plain PNGs, read back with pycocotools (and mmengine/mmseg
when installed) and compared with the run's masks pixel for pixel; hand-made masks for
the region and ignore rules; the guard's refusals; what is skipped and why."""
from __future__ import annotations

import json
import os
import runpy
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from typer.testing import CliRunner

from text2mask import guard
from text2mask.cli import app
from text2mask.errors import EXIT_CONFIG, EXIT_FAILED_ITEMS
from text2mask.export import regions, rle_annotation
from text2mask.io import read_index_png, write_index_png
from text2mask.visualize import PALETTE

pytestmark = pytest.mark.usefixtures("one_thread")

VOC = Path(__file__).resolve().parent.parent / "samples" / "voc-mini" / "VOC2012"
CROPS = {"a1": (100, 60, 260, 180), "b2": (0, 0, 96, 64)}
LABELS = {"a1.jpg": ["aeroplane", "person"], "b2.jpg": ["person"], "bad.jpg": ["dog"]}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(autouse=True)
def _release_inputs():
    yield
    guard.release()   # the API calls below protect their inputs for the rest of the process


@pytest.fixture(scope="module")
def wsss_run(tmp_path_factory, voc_predictor):
    """A real `generate` run of the tiny model over two VOC crops and one corrupt photo
    (which fails: the run's failures.jsonl names it)."""
    from text2mask.data.folder import load_folder
    from text2mask.wsss.run import RunOptions, generate

    root = tmp_path_factory.mktemp("wsss")
    photos = root / "photos"
    photos.mkdir()
    with Image.open(VOC / "JPEGImages" / "2007_000032.jpg") as im:
        for key, box in CROPS.items():
            im.crop(box).save(photos / f"{key}.jpg", quality=95)
    (photos / "bad.jpg").write_bytes(b"not a jpeg")
    (root / "labels.json").write_text(json.dumps(LABELS))
    ds = load_folder(photos, root / "labels.json", voc_predictor.class_set)
    summary = generate(voc_predictor, ds, RunOptions(out=root / "run", workers=0, progress=False), log=lambda m: None)
    assert summary.done == 2 and summary.failed == 1
    return root / "run"


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def hand_mask(h: int, w: int) -> np.ndarray:
    """Class 1 in two 8-connected blobs (one of them two squares touching at a corner),
    class 15 in one blob, 255 in two places, background elsewhere."""
    m = np.zeros((h, w), np.uint8)
    m[2:6, 2:6] = 1
    m[6:9, 6:9] = 1            # touches the first square at one corner: same 8-connected blob
    m[20:30, 40:50] = 1        # a second blob of class 1
    m[35:60, 60:90] = 15
    m[0:2, w - 5:w] = 255
    m[h - 3:h, 0:4] = 255
    return m


def decode(coco: COCO, image_id: int, shape) -> tuple[np.ndarray, np.ndarray]:
    """(labels, crowd pixels) painted from the image's annotations; an overlap of two
    non-crowd annotations fails the test."""
    labels, crowd = np.zeros(shape, np.int64), np.zeros(shape, bool)
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
        m = coco.annToMask(ann).astype(bool)
        assert m.sum() == ann["area"]
        ys, xs = np.nonzero(m)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        if ann["iscrowd"]:
            assert ann["category_id"] == 255
            crowd |= m
            continue
        assert not labels[m].any(), "two annotations share pixels"
        labels[m] = ann["category_id"]
    return labels, crowd


def check_detectron2_keys(doc: dict) -> None:
    """What detectron2's load_coco_json (detectron2/data/datasets/coco.py) reads and asserts:
    images with id, file_name, height, width; annotation ids unique; each annotation's
    image_id an image's; no "ignore" key; iscrowd, a 4-number bbox, category_id among the
    categories (it maps sorted category ids to 0..n-1); an RLE dict with size and counts."""
    images = {im["id"]: im for im in doc["images"]}
    assert all(isinstance(im["file_name"], str) and isinstance(im["height"], int) and isinstance(im["width"], int)
               for im in doc["images"])
    ids = [a["id"] for a in doc["annotations"]]
    assert len(set(ids)) == len(ids)
    cats = {c["id"] for c in doc["categories"]}
    assert all(isinstance(c["name"], str) for c in doc["categories"])
    for a in doc["annotations"]:
        assert a["image_id"] in images and a.get("ignore", 0) == 0 and a["category_id"] in cats
        assert a["iscrowd"] in (0, 1) and len(a["bbox"]) == 4
        seg = a["segmentation"]
        assert isinstance(seg, dict) and isinstance(seg["counts"], str)
        assert seg["size"] == [images[a["image_id"]]["height"], images[a["image_id"]]["width"]]


# --- coco-rle ------------------------------------------------------------------------------

def test_coco_rle_of_a_real_run_round_trips_and_names_the_failed_image(wsss_run, tmp_path):
    out = tmp_path / "coco"
    res = invoke("export", "--run", wsss_run, "--format", "coco-rle", "--out", out, "--no-progress")
    assert res.exit_code == EXIT_FAILED_ITEMS, res.output
    assert "bad: failed in the run [read]" in res.stderr and "MEANINGLESS" in res.stderr
    assert res.stdout.split() == [str(out / "annotations.json"), str(out / "export.json")]
    doc = json.loads((out / "annotations.json").read_text())
    check_detectron2_keys(doc)
    assert [c["id"] for c in doc["categories"]] == list(range(1, 21))       # background left out, contiguous
    assert doc["categories"][14]["name"] == "person"
    assert [(im["id"], im["file_name"]) for im in doc["images"]] == [(1, "a1.jpg"), (2, "b2.jpg")]
    assert doc["info"]["image_root"] == str((wsss_run.parent / "photos").resolve())
    coco = COCO(str(out / "annotations.json"))
    for im in doc["images"]:
        mask = read_index_png(wsss_run / "masks" / f"{Path(im['file_name']).stem}.png")
        labels, crowd = decode(coco, im["id"], mask.shape)
        assert not crowd.any()
        assert np.array_equal(labels, np.where(mask == 255, 0, mask))        # --ignore omit: 255 in no annotation
    record = json.loads((out / "export.json").read_text())
    assert record["exported"] == 2 and list(record["skipped"]) == ["bad"] and record["random_weights"] is True


@pytest.mark.parametrize("by", ["class", "component"])
@pytest.mark.parametrize("ignore", ["omit", "crowd"])
def test_coco_rle_of_hand_made_masks_round_trips_pixel_for_pixel(wsss_run, tmp_path, by, ignore):
    run = copy_run(wsss_run, tmp_path / "run")
    truth = hand_mask(120, 160)
    write_index_png(run / "masks" / "a1.png", truth)        # the WSSS writer's own function and format
    out = tmp_path / "coco"
    res = invoke("export", "--run", run, "--format", "coco-rle", "--regions", by, "--ignore", ignore, "--out", out)
    assert res.exit_code == EXIT_FAILED_ITEMS, res.output
    doc = json.loads((out / "annotations.json").read_text())
    check_detectron2_keys(doc)
    coco = COCO(str(out / "annotations.json"))
    labels, crowd = decode(coco, 1, truth.shape)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[1]))
    per_class = [a["category_id"] for a in anns if not a["iscrowd"]]
    assert per_class == ([1, 15] if by == "class" else [1, 1, 15])          # two 8-connected blobs of class 1
    if ignore == "crowd":
        assert np.array_equal(np.where(crowd, 255, labels), truth)         # lossless
        assert sum(a["iscrowd"] for a in anns) == 1 and doc["categories"][-1] == \
            {"id": 255, "name": "unsure", "supercategory": "ignore"}
    else:
        assert not crowd.any() and np.array_equal(labels, np.where(truth == 255, 0, truth))
        assert max(c["id"] for c in doc["categories"]) == 20


def test_rle_annotation_matches_an_independent_run_length_count():
    m = np.zeros((4, 5), bool)
    m[1:3, 1] = True
    m[0, 3] = True
    ann = rle_annotation(m, 7, 3, 2, 0)
    # COCO RLE counts run over the column-major pixels, starting with a run of zeros:
    # column 0 (4 zeros) + row 0 of column 1, then 2 ones, then 1 + 4 zeros (col 2) + 0 of col 3, ...
    flat = m.ravel(order="F").astype(int)
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    from pycocotools import mask as mask_util

    assert mask_util.frPyObjects({"size": [4, 5], "counts": runs}, 4, 5)["counts"].decode() == \
        ann["segmentation"]["counts"]
    assert ann["area"] == 3 and ann["bbox"] == [1.0, 0.0, 3.0, 3.0]
    assert (ann["id"], ann["image_id"], ann["category_id"], ann["iscrowd"]) == (7, 3, 2, 0)


def test_regions_leave_out_background_and_values_past_the_classes_count_as_nothing():
    m = np.array([[0, 2, 2], [255, 0, 1]], np.uint8)
    assert [(k, b.sum(), c) for k, b, c in regions(m, 3)] == [(1, 1, 0), (2, 2, 0)]
    assert [(k, b.sum(), c) for k, b, c in regions(m, 3, ignore="crowd")][-1] == (255, 1, 1)


# --- mmseg ---------------------------------------------------------------------------------

def test_mmseg_config_names_the_masks_photos_split_classes_palette_and_ignore(wsss_run, tmp_path):
    out = tmp_path / "mmseg"
    res = invoke("export", "--run", wsss_run, "--format", "mmseg", "--out", out)
    assert res.exit_code == EXIT_FAILED_ITEMS, res.output
    assert (out / "train.txt").read_text() == "a1\nb2\n"
    cfg = runpy.run_path(str(out / "dataset.py"))           # plain Python: no mmengine needed
    ds = cfg["text2mask_train"]
    assert ds["type"] == "BaseSegDataset" and ds["_delete_"] is True
    assert ds["data_root"] == str(out.resolve()) and ds["ann_file"] == "train.txt"
    assert ds["data_prefix"] == {"img_path": str((wsss_run.parent / "photos").resolve()),
                                 "seg_map_path": str((wsss_run / "masks").resolve())}
    assert (ds["img_suffix"], ds["seg_map_suffix"]) == (".jpg", ".png")
    assert ds["reduce_zero_label"] is False and ds["ignore_index"] == 255
    classes, palette = ds["metainfo"]["classes"], ds["metainfo"]["palette"]
    assert classes[0] == "background" and classes[15] == "person" and len(classes) == 21 == cfg["text2mask_num_classes"]
    assert palette == PALETTE[:21].tolist()
    assert [step["type"] for step in ds["pipeline"]][:2] == ["LoadImageFromFile", "LoadAnnotations"]
    for key in ("a1", "b2"):                              # mmseg joins prefix + id + suffix
        assert Path(ds["data_prefix"]["img_path"], key + ds["img_suffix"]).is_file()
        assert Path(ds["data_prefix"]["seg_map_path"], key + ds["seg_map_suffix"]).is_file()
    assert all(not k.startswith(("dataset_type", "data_root", "train_")) for k in cfg if not k.startswith("__"))


def test_mmseg_config_builds_the_dataset_with_mmengine_and_mmseg(wsss_run, tmp_path):
    mmengine = pytest.importorskip("mmengine")
    out = tmp_path / "mmseg"
    assert invoke("export", "--run", wsss_run, "--format", "mmseg", "--out", out).exit_code == EXIT_FAILED_ITEMS
    (tmp_path / "base.py").write_text("train_dataloader = dict(batch_size=4, dataset=dict(type='ConcatDataset', "
                                      "datasets=[]))\n")
    (tmp_path / "train.py").write_text(f"_base_ = ['./base.py', '{out / 'dataset.py'}']\n"
                                       "train_dataloader = dict(dataset={{_base_.text2mask_train}})\n")
    cfg = mmengine.Config.fromfile(str(tmp_path / "train.py"))
    ds = cfg.train_dataloader.dataset
    assert ds.type == "BaseSegDataset" and "_delete_" not in ds and "datasets" not in ds
    try:
        import mmseg.datasets  # noqa: F401
        from mmengine.registry import init_default_scope
        from mmseg.registry import DATASETS
    except ImportError:
        return
    init_default_scope("mmseg")
    dataset = DATASETS.build(ds)
    assert len(dataset) == 2 and dataset.metainfo["classes"][15] == "person"
    infos = [dataset.get_data_info(i) for i in range(len(dataset))]
    assert [(Path(d["img_path"]).name, Path(d["seg_map_path"]).name) for d in infos] == \
        [("a1.jpg", "a1.png"), ("b2.jpg", "b2.png")]
    assert all(d["reduce_zero_label"] is False for d in infos)
    sample = dataset[1]["data_samples"].gt_sem_seg.data      # through mmseg's own VOC pipeline
    assert set(np.unique(sample.numpy()).tolist()) <= set(np.unique(read_index_png(wsss_run / "masks" / "b2.png"))
                                                          .tolist()) | {255}   # Pad fills with 255


def test_mmseg_refuses_photos_of_several_suffixes(wsss_run, tmp_path):
    run = copy_run(wsss_run, tmp_path / "run")
    photos = shutil.copytree(wsss_run.parent / "photos", tmp_path / "photos")
    Image.open(photos / "b2.jpg").save(photos / "b2.png")
    (photos / "b2.jpg").unlink()
    res = invoke("export", "--run", run, "--format", "mmseg", "--images", photos, "--no-check-photos",
                 "--out", tmp_path / "out")
    assert res.exit_code == EXIT_CONFIG and "several suffixes (a1.jpg, b2.png" in res.stderr
    assert not (tmp_path / "out").exists()


# --- png -----------------------------------------------------------------------------------

def test_png_export_copies_the_masks_byte_for_byte_and_palette_keeps_the_indices(wsss_run, tmp_path):
    out = tmp_path / "png"
    res = invoke("export", "--run", wsss_run, "--format", "png", "--palette", "--out", out)
    assert res.exit_code == EXIT_FAILED_ITEMS, res.output
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["a1.png", "b2.png"]
    for key in ("a1", "b2"):
        src = wsss_run / "masks" / f"{key}.png"
        assert (out / "masks" / f"{key}.png").read_bytes() == src.read_bytes()
        with Image.open(out / "palette" / f"{key}.png") as im:
            assert im.mode == "P" and im.getpalette()[:3 * 16] == PALETTE[:16].ravel().tolist()
        assert np.array_equal(read_index_png(out / "palette" / f"{key}.png"), read_index_png(src))
    assert (out / "ids.txt").read_text() == "a1\nb2\n"
    assert (out / "classes.txt").read_text().splitlines()[:2] == ["background", "aeroplane"]


def test_a_palette_mask_in_the_run_is_written_as_a_grey_index_png(wsss_run, tmp_path):
    run = copy_run(wsss_run, tmp_path / "run")
    truth = hand_mask(120, 160)
    im = Image.fromarray(truth)
    im.putpalette(PALETTE.ravel().tolist())
    im.save(run / "masks" / "a1.png")
    invoke("export", "--run", run, "--format", "png", "--out", tmp_path / "png")
    with Image.open(tmp_path / "png" / "masks" / "a1.png") as out:
        assert out.mode == "L" and np.array_equal(np.asarray(out), truth)


# --- what is skipped, and the exit code ----------------------------------------------------

def test_a_complete_run_exports_with_exit_0(wsss_run, tmp_path):
    run = copy_run(wsss_run, tmp_path / "run")
    (run / "failures.jsonl").write_text("")
    doc = json.loads((run / "run.json").read_text())
    doc["missing"] = {"count": 0, "first": []}
    (run / "run.json").write_text(json.dumps(doc))
    res = invoke("export", "--run", run, "--format", "png")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run-png" / "masks" / "a1.png").is_file()        # default --out: <run>-<format>


def test_unusable_items_are_skipped_each_named(wsss_run, tmp_path):
    run = copy_run(wsss_run, tmp_path / "run")
    photos = shutil.copytree(wsss_run.parent / "photos", tmp_path / "photos")
    write_index_png(run / "masks" / "b2.png", np.full((64, 96), 30, np.uint8))     # no VOC class 30
    (photos / "a1.jpg").write_bytes((photos / "a1.jpg").read_bytes() + b"\0")     # changed since the run
    shutil.copy(run / "masks" / "b2.png", run / "masks" / "stray.png")           # no record
    rec = json.loads((run / "records" / "a1.json").read_text())
    (run / "records" / "late.json").write_text(json.dumps({**rec, "id": "late"}))  # record, no mask
    doc = json.loads((run / "run.json").read_text())
    doc["missing"] = {"count": 30, "first": ["bad", "late"]}
    (run / "run.json").write_text(json.dumps(doc))
    out = tmp_path / "out"
    res = invoke("export", "--run", run, "--format", "coco-rle", "--images", photos, "--out", out)
    assert res.exit_code == EXIT_FAILED_ITEMS
    skipped = json.loads((out / "export.json").read_text())["skipped"]
    assert sorted(skipped) == ["a1", "b2", "bad", "late", "stray"]
    assert "photo changed since the run" in skipped["a1"] and "value 30 is no class" in skipped["b2"]
    assert "no mask" in skipped["late"] and "no record" in skipped["stray"]
    assert json.loads((out / "export.json").read_text())["skipped_unnamed"] == 28
    assert "and 28 more without a mask" in res.stderr
    assert json.loads((out / "annotations.json").read_text())["images"] == []
    res = invoke("export", "--run", run, "--format", "coco-rle", "--images", photos, "--no-check-photos",
                 "--out", tmp_path / "out2")
    assert "a1" not in json.loads((tmp_path / "out2" / "export.json").read_text())["skipped"]


# --- refusals, before anything is written ----------------------------------------------------

def listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.parametrize("where, why", [
    ("inside", "lies inside the run folder"),
    ("run", "is the run folder"),
    ("above_photos", "contains the photo folder"),
    ("photos", "is the photo folder"),
])
def test_outputs_that_touch_an_input_are_refused(wsss_run, tmp_path, where, why):
    run = copy_run(wsss_run, tmp_path / "run")
    photos = shutil.copytree(wsss_run.parent / "photos", tmp_path / "data" / "photos")
    out = {"inside": run / "export", "run": run, "above_photos": tmp_path / "data", "photos": photos}[where]
    before, photos_before = listing(run), listing(photos)
    res = invoke("export", "--run", run, "--format", "coco-rle", "--images", photos, "--out", out)
    assert res.exit_code == EXIT_CONFIG and why in res.stderr, res.output
    assert "Traceback" not in res.output
    assert listing(run) == before and listing(photos) == photos_before


def test_an_existing_export_is_never_overwritten(wsss_run, tmp_path):
    out = tmp_path / "png"
    invoke("export", "--run", wsss_run, "--format", "png", "--out", out)
    before = listing(out)
    res = invoke("export", "--run", wsss_run, "--format", "png", "--out", out)
    assert res.exit_code == EXIT_CONFIG and "exists and is not empty" in res.stderr
    assert listing(out) == before
    (tmp_path / "file").write_text("x")
    res = invoke("export", "--run", wsss_run, "--format", "png", "--out", tmp_path / "file")
    assert res.exit_code == EXIT_CONFIG and "not a folder" in res.stderr


@pytest.mark.parametrize("args, text", [
    (["--format", "png", "--regions", "component"], "--regions and --ignore apply to --format coco-rle"),
    (["--format", "mmseg", "--palette"], "--palette applies to --format png"),
    (["--format", "png", "--images", "."], "--images applies to"),
])
def test_options_of_another_format_are_refused(wsss_run, tmp_path, args, text):
    res = invoke("export", "--run", wsss_run, *args, "--out", tmp_path / "o")
    assert res.exit_code == EXIT_CONFIG and text in res.stderr
    assert not (tmp_path / "o").exists()


def test_run_folders_that_cannot_be_exported_are_refused_naming_the_field(wsss_run, tmp_path):
    run = copy_run(wsss_run, tmp_path / "run")
    doc = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**doc, "config": 7}))
    res = invoke("export", "--run", run, "--format", "png", "--out", tmp_path / "o")
    assert res.exit_code == EXIT_CONFIG and "field config" in res.stderr
    (run / "run.json").write_text(json.dumps({**doc, "method": "slime"}))
    res = invoke("export", "--run", run, "--format", "png", "--out", tmp_path / "o")
    assert res.exit_code == EXIT_CONFIG and "a slime run" in res.stderr
    res = invoke("export", "--run", tmp_path / "nowhere", "--format", "png")
    assert res.exit_code == EXIT_CONFIG and "run folder not found" in res.stderr


def test_a_run_being_written_is_refused(wsss_run, tmp_path):
    run = copy_run(wsss_run, tmp_path / "run")
    part = json.loads((run / "status" / "all.json").read_text())
    (run / ".holders").mkdir(exist_ok=True)
    (run / ".holders" / "live.json").write_text("{}")
    os.utime(run / ".holders" / "live.json")
    (run / "status" / "all.json").write_text(json.dumps({**part, "status": "running", "holder": "live.json"}))
    res = invoke("export", "--run", run, "--format", "png", "--out", tmp_path / "o")
    assert res.exit_code == EXIT_CONFIG and "is being written now" in res.stderr
