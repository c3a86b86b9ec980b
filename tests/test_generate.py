"""End to end: `text2mask generate` on real VOC photos with the tiny model, and the API."""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from text2mask.cli import app
from text2mask.evaluation.semantic import confusion, evaluate_dirs, scores
from text2mask.io import read_index_png

VOC = Path(__file__).resolve().parent.parent / "samples" / "voc-mini" / "VOC2012"
IDS = ["2007_000063", "2007_000129", "2007_000392"]  # chair+dog, bicycle+person, horse+person


@pytest.fixture(scope="module")
def voc_tree(tmp_path_factory):
    """A VOC2012 folder with three real multi-class photos (train split)."""
    root = tmp_path_factory.mktemp("voc") / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    for i in IDS:
        (root / "JPEGImages" / f"{i}.jpg").write_bytes((VOC / "JPEGImages" / f"{i}.jpg").read_bytes())
        (root / "SegmentationClass" / f"{i}.png").write_bytes((VOC / "SegmentationClass" / f"{i}.png").read_bytes())
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(IDS) + "\n")
    return root


@pytest.fixture(scope="module")
def run_dir(voc_tree, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    res = CliRunner().invoke(app, ["generate", "--dataset", "voc", "--data-root", str(voc_tree), "--split", "train",
                                   "--model", str(tiny_model_dir), "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    return out


def test_one_mask_per_image_in_every_folder(run_dir):
    for folder in ("initial", "crf", "masks"):
        assert sorted(p.stem for p in (run_dir / folder).glob("*.png")) == IDS
    assert not list(run_dir.rglob("*.tmp"))


def test_masks_are_index_pngs_that_read_back_identically(run_dir):
    for folder in ("initial", "crf", "masks"):
        for i in IDS:
            path = run_dir / folder / f"{i}.png"
            with Image.open(path) as im:
                assert im.mode == "L"
                pil = np.asarray(im)
            gt = read_index_png(VOC / "SegmentationClass" / f"{i}.png")
            assert pil.shape == gt.shape
            np.testing.assert_array_equal(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), pil)
            np.testing.assert_array_equal(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), pil)
            present = set(np.unique(gt)) - {255}
            allowed = present | ({255} if folder == "masks" else set())
            assert set(np.unique(pil)) <= allowed  # only the image's own labels (and background)


def test_training_mask_is_crf_labels_with_ignore(run_dir):
    for i in IDS:
        crf = read_index_png(run_dir / "crf" / f"{i}.png")
        mask = read_index_png(run_dir / "masks" / f"{i}.png")
        sure = mask != 255
        np.testing.assert_array_equal(mask[sure], crf[sure])
        assert 255 not in crf


def test_run_json_records_the_configuration(run_dir, tiny_model_dir):
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "complete"
    assert run["run"]["done"] == 3 and run["run"]["failed"] == 0
    assert run["model"]["local"] is True and len(run["model"]["folder_sha256"]) == 64
    assert run["model"]["random_weights"] is True
    method = run["fingerprint"]["method"]
    assert (method["samples"], method["timestep"], method["box_threshold"], method["background_tau"],
            method["background_power"], method["crf_image"]) == (1, 150, 0.2, 1.0, 2.0, "reference")
    assert run["dataset"]["images"] == 3 and run["dataset"]["split"] == "train"
    assert "torch" in run["versions"] and "diffusers" in run["versions"]
    # The writer pool was sized from measured rates (the default), and says so.
    sizing = run["run"]["writer_sizing"]
    assert run["options"]["workers"] == "auto" and sizing["auto"] is True
    assert 1 <= run["run"]["writer_workers"] <= sizing["cap"] == max((os.cpu_count() or 1) - 1, 1)
    assert sizing["model_seconds_per_item"] > 0 and sizing["finish_seconds_per_item"] > 0
    assert 0 <= run["run"]["queue_wait_share"] < 1


def test_metrics_json_matches_an_independent_evaluation(run_dir, voc_tree):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["images"] == 3
    for folder in ("initial", "crf"):
        conf = sum(confusion(read_index_png(voc_tree / "SegmentationClass" / f"{i}.png"),
                             read_index_png(run_dir / folder / f"{i}.png"), 21) for i in IDS)
        assert metrics[folder]["mIoU"] == pytest.approx(scores(conf)["mIoU"], abs=1e-12)
    assert 0 < metrics["masks"]["coverage"] <= 100  # percent, as every metric


def test_evaluate_command_prints_the_same_numbers(run_dir, voc_tree, tmp_path):
    out_json = tmp_path / "m.json"
    res = CliRunner().invoke(app, ["evaluate", "--pred", str(run_dir / "crf"), "--gt",
                                   str(voc_tree / "SegmentationClass"), "--json", str(out_json)])
    assert res.exit_code == 0, res.output
    direct = evaluate_dirs(run_dir / "crf", voc_tree / "SegmentationClass")
    assert json.loads(out_json.read_text())["mIoU"] == pytest.approx(direct["mIoU"])
    assert f"{direct['mIoU']:.1f}" in res.output and "horse" in res.output


def test_rerun_skips_finished_images(run_dir, voc_tree, tiny_model_dir):
    before = {p: p.read_bytes() for p in run_dir.rglob("*.png")}
    res = CliRunner().invoke(app, ["generate", "--data-root", str(voc_tree), "--model", str(tiny_model_dir),
                                   "--out", str(run_dir), "--workers", "0", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "3 already complete" in res.output
    assert {p: p.read_bytes() for p in run_dir.rglob("*.png")} == before


def test_python_api_matches_the_cli_output(tiny_model_dir, run_dir):
    from text2mask import MaskConfig, Text2Mask

    t2m = Text2Mask.from_pretrained(str(tiny_model_dir), "voc", MaskConfig())
    res = t2m(VOC / "JPEGImages" / "2007_000392.jpg", ["horse", "person"])
    assert res.classes == (0, 13, 15)
    assert res.scores.shape == (3, 332, 500) and np.isfinite(res.scores).all()
    np.testing.assert_array_equal(res.labels, read_index_png(run_dir / "initial" / "2007_000392.png"))
    np.testing.assert_array_equal(res.crf, read_index_png(run_dir / "crf" / "2007_000392.png"))
    np.testing.assert_array_equal(res.mask, read_index_png(run_dir / "masks" / "2007_000392.png"))
