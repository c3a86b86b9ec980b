"""Resume notices changed inputs (issue 16) and another configuration's leftovers (issue 10.1),
on real VOC photos with the tiny model (MEANINGLESS masks: mechanics only).

Each case: a run, a real change of one input file, a re-run into the same folder. The
re-run redoes exactly the changed image, says so (summary, run.json), and its outputs
then equal a fresh run's byte for byte.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from text2mask.data.folder import load_folder
from text2mask.data.voc import load_voc
from text2mask.runs.records import record_path
from text2mask.wsss.run import RunOptions, generate

VOC = Path(__file__).resolve().parent.parent / "samples" / "voc-mini" / "VOC2012"
A, B = "2007_000032", "2007_000039"       # aeroplane+person 500x281, tvmonitor 500x375
OUTPUTS = ("initial", "crf", "masks")


def run(predictor, dataset, out: Path, **opts):
    return generate(predictor, dataset, RunOptions(out=out, workers=0, progress=False, evaluate=False, **opts),
                    log=lambda m: None)


def outputs(out: Path, key: str) -> dict[str, bytes]:
    return {f: (out / f / f"{key}.png").read_bytes() for f in OUTPUTS}


def folder_dataset(root: Path, labels: dict[str, list[str]]):
    (root / "labels.json").write_text(json.dumps(labels))
    return load_folder(root / "photos", root / "labels.json", "voc")


def photos(root: Path, keys) -> Path:
    (root / "photos").mkdir(parents=True, exist_ok=True)
    for k in keys:
        shutil.copy(VOC / "JPEGImages" / f"{k}.jpg", root / "photos" / f"{k}.jpg")
    return root / "photos"


def assert_redid_exactly(summary, key, out, fresh_out, others_before):
    assert (summary.done, summary.skipped, summary.failed) == (1, 1, 0), summary
    assert summary.redone_changed == [key]
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["run"]["redone_changed"] == [key]
    assert outputs(out, key) == outputs(fresh_out, key)
    other = B if key == A else A
    assert outputs(out, other) == others_before


def test_changed_json_labels_redo_that_image_only(voc_predictor, tmp_path):
    photos(tmp_path, [A, B])
    labels = {f"{A}.jpg": ["aeroplane"], f"{B}.jpg": ["tvmonitor"]}
    out = tmp_path / "out"
    first = run(voc_predictor, folder_dataset(tmp_path, labels), out)
    assert (first.done, first.failed) == (2, 0)
    assert json.loads(record_path(out, A).read_text())["inputs"]["labels"] == [1]
    before_a, before_b = outputs(out, A), outputs(out, B)

    labels[f"{A}.jpg"] = ["aeroplane", "person"]           # the user notices the person
    again = run(voc_predictor, folder_dataset(tmp_path, labels), out)
    assert json.loads(record_path(out, A).read_text())["inputs"]["labels"] == [1, 15]
    assert outputs(out, A) != before_a

    fresh = tmp_path / "fresh"
    (tmp_path / "only").mkdir()
    photos(tmp_path / "only", [A])
    run(voc_predictor, folder_dataset(tmp_path / "only", {f"{A}.jpg": ["aeroplane", "person"]}), fresh)
    assert_redid_exactly(again, A, out, fresh, before_b)

    # unchanged inputs: nothing is redone
    third = run(voc_predictor, folder_dataset(tmp_path, labels), out)
    assert (third.done, third.skipped, third.redone_changed) == (0, 2, [])


def test_changed_voc_ground_truth_used_as_labels_redoes_that_image(voc_predictor, tmp_path, make_voc_tree):
    root = make_voc_tree(tmp_path / "VOC2012", [A, B])
    out = tmp_path / "out"
    first = run(voc_predictor, load_voc(root, "train"), out)
    assert first.done == 2

    # correct B's ground truth: a chair (9) region is added next to the monitor
    gt_path = root / "SegmentationClass" / f"{B}.png"
    with Image.open(gt_path) as im:
        palette, gt = im.getpalette(), np.array(im)
    gt[300:360, 20:120] = 9
    im = Image.fromarray(gt, mode="P")
    im.putpalette(palette)
    im.save(gt_path)
    again = run(voc_predictor, load_voc(root, "train"), out)
    assert json.loads(record_path(out, B).read_text())["inputs"]["labels"] == [9, 20]

    fresh_root = make_voc_tree(tmp_path / "fresh-VOC2012", [B])
    shutil.copy(gt_path, fresh_root / "SegmentationClass" / f"{B}.png")
    fresh = tmp_path / "fresh"
    run(voc_predictor, load_voc(fresh_root, "train"), fresh)
    assert (again.done, again.skipped, again.redone_changed) == (1, 1, [B])
    assert outputs(out, B) == outputs(fresh, B)
    assert outputs(out, A) != outputs(out, B)
    assert json.loads((out / "run.json").read_text())["run"]["redone_changed"] == [B]


def test_replaced_photo_under_the_same_name_redoes_that_image(voc_predictor, tmp_path):
    photos(tmp_path, [A, B])
    labels = {f"{A}.jpg": ["aeroplane"], f"{B}.jpg": ["aeroplane"]}
    out = tmp_path / "out"
    run(voc_predictor, folder_dataset(tmp_path, labels), out)
    before_a = outputs(out, A)

    other = "2007_000063"                                   # another photo, 500x375, same name as B
    shutil.copy(VOC / "JPEGImages" / f"{other}.jpg", tmp_path / "photos" / f"{B}.jpg")
    again = run(voc_predictor, folder_dataset(tmp_path, labels), out)

    (tmp_path / "only").mkdir()
    photos(tmp_path / "only", [])
    shutil.copy(VOC / "JPEGImages" / f"{other}.jpg", tmp_path / "only" / "photos" / f"{B}.jpg")
    fresh = tmp_path / "fresh"
    run(voc_predictor, folder_dataset(tmp_path / "only", {f"{B}.jpg": ["aeroplane"]}), fresh)
    assert_redid_exactly(again, B, out, fresh, before_a)


def test_interrupted_overwrite_does_not_pass_old_images_as_complete(voc_predictor, tmp_path, tiny_model_dir):
    """Issue 10.1: samples=1 complete; samples=2 --overwrite stopped after one image (the
    state a kill -9 leaves); a plain samples=2 resume must redo the other image."""
    from text2mask.wsss.predictor import MaskConfig, Text2Mask

    photos(tmp_path, [A, B])
    ds = folder_dataset(tmp_path, {f"{A}.jpg": ["aeroplane"], f"{B}.jpg": ["tvmonitor"]})
    out = tmp_path / "out"
    assert run(voc_predictor, ds, out).done == 2
    two = Text2Mask(voc_predictor.sd, "voc", MaskConfig(samples=2))
    assert run(two, ds, out, overwrite=True, limit=1).done == 1        # A redone, then "killed"
    resumed = run(two, ds, out)
    assert (resumed.done, resumed.skipped, resumed.redone_stale) == (1, 1, [B])
    fresh = tmp_path / "fresh"
    run(two, ds, fresh)
    for key in (A, B):
        assert outputs(out, key) == outputs(fresh, key)
    records = {json.loads(record_path(out, k).read_text())["config"] for k in (A, B)}
    assert records == {json.loads((out / "run.json").read_text())["config"]}
