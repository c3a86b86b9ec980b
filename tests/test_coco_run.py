"""COCO end to end on the real COCO photos, and prompt overflow on a real COCO photo."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from text2mask.cli import app
from text2mask.io import read_image, read_index_png
from text2mask.classes import load_class_set

COCO = Path(__file__).resolve().parent.parent / "samples" / "coco-mini"


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    shutil.copytree(COCO / "images", root / "val2014")
    (root / "annotations").mkdir()
    shutil.copy(COCO / "annotations" / "instances_mini.json", root / "annotations" / "instances_val2014.json")
    return root


def test_generate_on_coco_writes_masks_and_81_class_metrics(coco_root, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["generate", "--dataset", "coco", "--data-root", str(coco_root), "--split", "val",
                                   "--model", str(tiny_model_dir), "--out", str(out), "--workers", "0",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    ids = sorted(p.stem for p in (coco_root / "val2014").glob("*.jpg"))
    gt_dir = coco_root / "SegmentationClass" / "val2014"
    assert sorted(p.stem for p in gt_dir.glob("*.png")) == ids   # GT rendered once, cached
    for i in ids:
        mask = read_index_png(out / "masks" / f"{i}.png")
        assert mask.shape == read_image(coco_root / "val2014" / f"{i}.jpg").shape[:2]
        labels = set(np.unique(read_index_png(gt_dir / f"{i}.png")).tolist()) - {255}
        assert set(np.unique(read_index_png(out / "crf" / f"{i}.png")).tolist()) <= labels | {0}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 4
    per_class = metrics["crf"]["per_class"]
    assert len(per_class) == 81 and per_class[1]["name"] == "person" and per_class[80]["name"] == "toothbrush"
    # present in GT: background + dog, person, tennis racket, handbag, backpack, cat, remote, couch, bed
    assert metrics["crf"]["classes_in_mean"] == 10
    run = json.loads((out / "run.json").read_text())
    assert run["fingerprint"]["method"]["box_threshold"] == 0.5
    assert run["fingerprint"]["method"]["background_tau"] == 0.7


def test_a_fifteen_class_label_set_overflows_without_losing_a_class(coco_root, tiny_model_dir, tmp_path):
    coco = load_class_set("coco")
    # COCO_val2014_000000001000's real labels plus more, in a folder dataset: 17 classes
    # (the first 16 fill exactly 77 tokens with background words; the 17th overflows)
    names = ["person", "tennis racket", "handbag", "backpack", "bench", "chair", "bottle", "cup", "umbrella",
             "sports ball", "baseball glove", "car", "hair drier", "remote", "cell phone", "dining table", "clock"]
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(coco_root / "val2014" / "COCO_val2014_000000001000.jpg", images / "court.jpg")
    (tmp_path / "labels.json").write_text(json.dumps({"court.jpg": names}))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["generate", "--dataset", "folder", "--images", str(images), "--labels",
                                   str(tmp_path / "labels.json"), "--prompts", "coco", "--model",
                                   str(tiny_model_dir), "--out", str(out), "--workers", "0", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "court: prompt too long for 77 tokens: dropped background words" in res.output
    assert read_index_png(out / "masks" / "court.png").shape == (480, 640)

    from text2mask import MaskConfig, Text2Mask

    t2m = Text2Mask.from_pretrained(str(tiny_model_dir), "coco", MaskConfig())
    classes = sorted(coco.index_of(n) for n in names)
    result = t2m(images / "court.jpg", names)
    assert result.classes == (0, *classes)                 # every class has its score map
    assert result.scores.shape == (18, 480, 640) and np.isfinite(result.scores).all()
    assert set(np.unique(result.labels).tolist()) <= {0, *classes}

    # 40 classes cannot share one prompt: they are split over passes of one UNet call
    many = list(range(1, 41))
    plan = t2m.plan(many)
    assert plan.actions[-1].startswith("split the classes over") and len(plan.prompts) >= 2
    assert sorted(plan.classes) == many
    att = t2m.attend([("court", read_image(images / "court.jpg"), plan)])[0]
    assert att.classes == (0, *many) and att.scores.shape[0] == 41 and np.isfinite(att.scores).all()
