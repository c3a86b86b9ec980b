"""Run records that describe what is on disk (issue 17: items 1, 3, 5 and paths of 6).

Real VOC crops without image-level labels: the masks are all background and need no
model call, so each run takes seconds; the ground truth crops hold real aeroplane,
person and void pixels, so the metrics are not trivial. Expected numbers come from an
independent numpy computation.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from text2mask.data.voc import load_voc
from text2mask.wsss.predictor import MaskConfig, Text2Mask
from text2mask.wsss.run import RunOptions, generate

VOC = Path(__file__).resolve().parent.parent / "samples" / "voc-mini" / "VOC2012"
SOURCE = "2007_000032"                 # aeroplane, person, void borders
CROPS = {"c1": (100, 60, 260, 180), "c2": (300, 150, 420, 260), "c3": (0, 0, 96, 64)}


def voc_crops(root: Path, aug: list[str], plain: list[str]) -> Path:
    """A VOC tree of crops; ground truth of ``aug`` in SegmentationClassAug/, of ``plain``
    in SegmentationClass/; image-level labels from a file (empty: no model call)."""
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    with Image.open(VOC / "JPEGImages" / f"{SOURCE}.jpg") as photo, \
            Image.open(VOC / "SegmentationClass" / f"{SOURCE}.png") as gt:
        for key, box in CROPS.items():
            photo.crop(box).save(root / "JPEGImages" / f"{key}.jpg", quality=95)
            for folder, keys in (("SegmentationClassAug", aug), ("SegmentationClass", plain)):
                if key in keys:
                    gt.crop(box).save(root / folder / f"{key}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("".join(f"{k}\n" for k in CROPS))
    (root / "labels.json").write_text(json.dumps({k: [] for k in CROPS}))
    return root


def dataset(root: Path):
    return load_voc(root, "train", "file", root / "labels.json")


def run(predictor, ds, out, **opts):
    logs = []
    summary = generate(predictor, ds, RunOptions(out=out, workers=0, progress=False, **opts), log=logs.append)
    return summary, logs


def miou_by_hand(pairs) -> float:
    """Present-class mean IoU (percent) of one confusion matrix over every pair, GT 255 skipped."""
    conf = np.zeros((21, 21), np.int64)
    for pred, gt in pairs:
        p, g = np.asarray(Image.open(pred)).ravel(), np.asarray(Image.open(gt)).ravel()
        keep = g != 255
        np.add.at(conf, (g[keep], p[keep]), 1)
    tp, gt_c, pred_c = np.diag(conf), conf.sum(1), conf.sum(0)
    present = gt_c > 0
    return float(100 * np.mean(tp[present] / (gt_c + pred_c - tp)[present]))


def test_ground_truth_is_found_per_image_and_missing_ones_are_named(voc_predictor, tmp_path):
    root = voc_crops(tmp_path / "VOC2012", aug=["c1"], plain=["c1", "c2"])     # c3: no GT at all
    out = tmp_path / "out"
    summary, logs = run(voc_predictor, dataset(root), out)
    assert summary.done == 3 and summary.no_gt == ["c3"]
    assert any("c3" in ln and "no ground truth" in ln for ln in logs), logs
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 2 and metrics["no_gt"] == ["c3"]
    assert metrics["gt_dirs"] == sorted([str(root / "SegmentationClass"), str(root / "SegmentationClassAug")])
    expected = miou_by_hand([(out / "masks" / "c1.png", root / "SegmentationClassAug" / "c1.png"),
                             (out / "masks" / "c2.png", root / "SegmentationClass" / "c2.png")])
    assert 0 < expected < 100
    assert metrics["masks"]["mIoU"] == pytest.approx(expected, abs=1e-9)


def test_no_crf_over_a_crf_run_sets_the_old_crf_folder_aside(voc_predictor, tmp_path):
    root = voc_crops(tmp_path / "VOC2012", aug=[], plain=list(CROPS))
    out = tmp_path / "out"
    run(voc_predictor, dataset(root), out)
    assert sorted(p.stem for p in (out / "crf").glob("*.png")) == sorted(CROPS)
    no_crf = Text2Mask(voc_predictor.sd, "voc", MaskConfig(crf=False))
    summary, logs = run(no_crf, dataset(root), out, overwrite=True)
    assert summary.done == 3
    assert not (out / "crf").exists()
    aside = list(out.glob("crf.stale-*"))
    assert len(aside) == 1 and len(list(aside[0].glob("*.png"))) == 3
    assert any("crf set aside" in ln for ln in logs), logs
    metrics = json.loads((out / "metrics.json").read_text())
    assert "crf" not in metrics and {"initial", "masks"} <= set(metrics)
    assert json.loads((out / "run.json").read_text())["fingerprint"]["method"]["crf"] is False


def test_metrics_are_set_aside_when_the_masks_change_without_them(voc_predictor, tmp_path):
    root = voc_crops(tmp_path / "VOC2012", aug=[], plain=list(CROPS))
    out = tmp_path / "out"
    run(voc_predictor, dataset(root), out, limit=1)
    assert json.loads((out / "metrics.json").read_text())["images"] == 1

    # more images, --no-evaluate: the old numbers no longer describe masks/
    summary, _ = run(voc_predictor, dataset(root), out, limit=3, evaluate=False)
    assert summary.done == 2
    assert not (out / "metrics.json").exists() and len(list(out.glob("metrics.stale-*.json"))) == 1
    assert json.loads((out / "run.json").read_text())["metrics"] is None

    run(voc_predictor, dataset(root), out)               # evaluated again: fresh numbers
    assert json.loads((out / "metrics.json").read_text())["images"] == 3

    # --overwrite with another setting and --no-evaluate
    other = Text2Mask(voc_predictor.sd, "voc", MaskConfig(confidence=0.5))
    run(other, dataset(root), out, overwrite=True, evaluate=False)
    assert not (out / "metrics.json").exists() and len(list(out.glob("metrics.stale-*.json"))) == 2


def test_every_path_in_run_json_is_absolute(voc_predictor, tmp_path, monkeypatch):
    voc_crops(tmp_path / "VOC2012", aug=["c1"], plain=["c2"])
    monkeypatch.chdir(tmp_path)
    run(voc_predictor, dataset(Path("VOC2012")), Path("out"))
    doc = json.loads((tmp_path / "out" / "run.json").read_text())
    ds = doc["dataset"]
    assert ds["image_dir"] == str(tmp_path / "VOC2012" / "JPEGImages")
    assert Path(ds["gt_dir"]).is_absolute()
    assert all(Path(p["failures_file"]).is_absolute() for p in doc["parts"])
    assert doc["cwd"] == str(tmp_path)              # what the typed command's relative paths meant
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert all(Path(d).is_absolute() for d in metrics["gt_dirs"])
