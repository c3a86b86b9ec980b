"""`text2mask slime fit | segment | import | evaluate` through the real CLI, on the tiny
random SD model (MEANINGLESS weights) and the real photos of samples/slime-mini."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from text2mask.cli import app
from text2mask.errors import EXIT_CONFIG
from text2mask.io import read_image, read_index_png

SAMPLES = Path(__file__).resolve().parent.parent / "samples/slime-mini"
CAR, CAR_MASK, BUS, BUS_MASK = (SAMPLES / n for n in ("car.jpg", "car.png", "bus.jpg", "bus.png"))
CLASSES = "background,top,bottom"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error(res, *texts) -> str:
    assert res.exit_code == EXIT_CONFIG, res.output
    assert "Traceback" not in res.output, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr
    for t in texts:
        assert t in lines[0], (t, lines[0])
    return lines[0]


def fit_args(tmp_path, *extra, classes=CLASSES, image=CAR, mask=CAR_MASK):
    return ("slime", "fit", "--image", image, "--mask", mask, "--classes", classes,
            "--model", "/no/such/model", "--out", tmp_path / "p.slime", "--device", "cpu", *extra)


@pytest.fixture(scope="module")
def parts_file(one_thread, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("slime-cli") / "parts.slime"
    res = invoke("slime", "fit", "--image", CAR, "--mask", CAR_MASK, "--image", BUS, "--mask", BUS_MASK,
                 "--classes", CLASSES, "--model", tiny_model_dir, "--out", out, "--epochs", "1",
                 "--canvas", "128", "--device", "cpu", "--no-progress")
    assert res.exit_code == 0, res.output
    assert not out.with_name(out.name + ".ckpt").exists()
    return out


def test_fit_writes_a_parts_file(parts_file):
    from text2mask.slime.artifact import load_parts

    p = load_parts(parts_file)
    assert p.classes == CLASSES.split(",") and p.settings["segment"]["canvas"] == 128


def test_segment_writes_masks_at_the_photo_size_and_resumes(parts_file, tiny_model_dir, tmp_path):
    out = tmp_path / "seg"
    args = ("slime", "segment", CAR, BUS, "--parts", parts_file, "--model", tiny_model_dir, "--out", out,
            "--class-threshold", "0", "--pictures", "--gt", SAMPLES, "--workers", "0", "--device", "cpu",
            "--no-progress")
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    for photo in (CAR, BUS):
        labels = read_index_png(out / "masks" / f"{photo.stem}.png")
        assert labels.shape == read_image(photo).shape[:2] and labels.max() <= 2
        assert Image.open(out / "masks" / f"{photo.stem}.png").mode == "L"
        w, h = Image.open(photo).size
        assert Image.open(out / "overlays" / f"{photo.stem}.png").size == (w, h)
        strip = Image.open(out / "pictures" / f"{photo.stem}.png")   # photo | 3 WAS maps | labels
        assert strip.width == 5 * w and strip.height > h
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 2 and set(metrics) >= {"official", "confusion"}
    again = invoke(*args)
    assert again.exit_code == 0 and "2 already complete" in again.stderr

    res = invoke("slime", "evaluate", "--pred", out / "masks", "--gt", SAMPLES, "--classes", CLASSES,
                 "--json", tmp_path / "m.json")
    assert res.exit_code == 0, res.output
    assert "per-image protocol" in res.stdout
    assert json.loads((tmp_path / "m.json").read_text())["images"] == 2


def test_import_official_folder(parts_file, tiny_model_dir, tmp_path):
    from text2mask.slime.artifact import load_parts

    cond = load_parts(parts_file).cond
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for i in range(2):
        torch.save(cond[i + 1][None, None], folder / f"embedding_{i}.pth")
    res = invoke("slime", "import", folder, "--out", tmp_path / "imp.slime", "--classes", CLASSES,
                 "--model", tiny_model_dir, "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert torch.equal(load_parts(tmp_path / "imp.slime").cond, cond)


def test_mask_of_another_size(tmp_path):
    one_error(invoke(*fit_args(tmp_path, mask=BUS_MASK)), "bus.png", "500x375", "500x333")


def test_mask_values_outside_the_classes(tmp_path):
    one_error(invoke(*fit_args(tmp_path, classes="background,top")), "car.png", "values [2]")


def test_class_absent_from_every_mask(tmp_path):
    one_error(invoke(*fit_args(tmp_path, classes="background,top,bottom,wheel")), "3 (wheel)", "none of the masks")


@pytest.mark.parametrize("classes", ["", " , "])
def test_empty_class_list(tmp_path, classes):
    one_error(invoke(*fit_args(tmp_path, classes=classes)), "class list is empty")


def test_npy_mask_and_unequal_counts(tmp_path):
    npy = tmp_path / "car.npy"
    np.save(npy, read_index_png(CAR_MASK).astype(np.float32) + 0.5)
    one_error(invoke(*fit_args(tmp_path, mask=npy)), "car.npy", "integers")
    res = invoke("slime", "fit", "--image", CAR, "--image", BUS, "--mask", CAR_MASK, "--classes", CLASSES,
                 "--model", "/no/such/model", "--out", tmp_path / "p.slime")
    one_error(res, "2 --image but 1 --mask")


def test_segment_refuses_a_missing_parts_file(tmp_path):
    res = invoke("slime", "segment", CAR, "--parts", tmp_path / "none.slime", "--out", tmp_path / "o")
    one_error(res, "none.slime", "not found")
