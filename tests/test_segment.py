"""`text2mask segment`: open-vocabulary phrases on a real VOC photo with the tiny model."""
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from text2mask.cli import app
from text2mask.errors import EXIT_CONFIG

PHOTO = Path(__file__).resolve().parent.parent / "samples" / "voc-mini" / "VOC2012" / "JPEGImages" / "2007_000039.jpg"


def segment(tiny_model_dir, *args):
    return CliRunner().invoke(app, ["segment", *map(str, args), "--model", str(tiny_model_dir), "--device", "cpu"])


def test_segment_writes_index_mask_and_overlay(tiny_model_dir, tmp_path):
    res = segment(tiny_model_dir, PHOTO, "--labels", "horse, person riding", "--out", tmp_path)
    assert res.exit_code == 0, res.output
    with Image.open(PHOTO) as im:
        size = im.size
    with Image.open(tmp_path / "2007_000039.png") as im:
        assert im.mode == "L" and im.size == size
        assert set(np.unique(np.asarray(im)).tolist()) <= {0, 1, 2, 255}
    with Image.open(tmp_path / "2007_000039_overlay.png") as im:
        assert im.mode == "RGB" and im.size == size


def test_segment_missing_image_fails_that_image_only(tiny_model_dir, tmp_path):
    missing = tmp_path / "no-such-photo.jpg"
    res = segment(tiny_model_dir, missing, PHOTO, "--labels", "horse", "--out", tmp_path / "out", "--no-crf")
    assert res.exit_code != 0
    assert str(missing) in res.output
    assert (tmp_path / "out" / "2007_000039.png").is_file()
    assert (tmp_path / "out" / "2007_000039_overlay.png").is_file()
    assert not (tmp_path / "out" / "no-such-photo.png").exists()


def test_segment_rejects_empty_and_repeated_phrases(tiny_model_dir, tmp_path):
    for labels in (" , ", "dog, Dog"):
        res = segment(tiny_model_dir, PHOTO, "--labels", labels, "--out", tmp_path)
        assert res.exit_code == EXIT_CONFIG and "--labels" in res.output
