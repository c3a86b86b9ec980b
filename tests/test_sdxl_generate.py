"""WSSS `generate` and `segment` end to end on the tiny SDXL model (issue 24). MEANINGLESS
masks (random weights): what is checked is that every stage runs on SDXL's layout and
conditioning, at SDXL's input size, and that the CLI writes what the Python API computes."""
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from text2mask.cli import app
from text2mask.io import read_image, read_index_png
from text2mask.preprocess import geometry

IDS = ["2007_000392"]  # horse + person
VOC_JPEG = Path(__file__).resolve().parent.parent / "samples/voc-mini/VOC2012/JPEGImages"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_generate_on_sdxl(tmp_path, tiny_sdxl_dir, make_voc_tree):
    from text2mask import MaskConfig, Text2Mask

    voc = make_voc_tree(tmp_path / "VOC2012", IDS)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["generate", "--data-root", str(voc), "--model", str(tiny_sdxl_dir), "--out", str(out),
                                   "--workers", "0", "--no-progress", "--device", "cpu", "--dtype", "fp32"])
    assert res.exit_code == 0, res.output
    assert "random weights" in res.output and "MEANINGLESS" in res.output
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["model"]["family"] == "sdxl"
    assert run["fingerprint"]["model"]["family"] == "sdxl"
    t2m = Text2Mask.from_pretrained(str(tiny_sdxl_dir), "voc", MaskConfig(), device="cpu", dtype="fp32")
    for i in IDS:
        photo = read_image(voc / "JPEGImages" / f"{i}.jpg")
        # SDXL's input: 1024 on the long side (SD 1.x: the reference's band for 500x332, 832)
        g, ref = t2m.geometry(*photo.shape[:2]), geometry(*photo.shape[:2])
        assert max(g.resized_height, g.resized_width) == 1024 and max(ref.resized_height, ref.resized_width) == 832
        mask = read_index_png(out / "masks" / f"{i}.png")
        assert mask.shape == photo.shape[:2]
        gt_classes = {int(v) for v in np.unique(read_index_png(voc / "SegmentationClass" / f"{i}.png"))} - {0, 255}
        assert set(np.unique(mask).tolist()) <= {0, 255} | gt_classes
        api = t2m(photo, sorted(gt_classes), key=i)
        assert np.array_equal(api.mask, mask) and np.array_equal(api.labels, read_index_png(out / "initial" / f"{i}.png"))
        assert len(np.unique(api.labels)) > 1   # the classes do get pixels


def test_segment_on_sdxl(tmp_path, tiny_sdxl_dir):
    from PIL import Image

    from text2mask.wsss.predictor import MaskConfig, Text2Mask

    photo = tmp_path / "dog.png"
    src = read_image(VOC_JPEG / "2007_000063.jpg")  # chair + dog
    Image.fromarray(src[::2, ::2]).save(photo)
    out = tmp_path / "seg"
    res = CliRunner().invoke(app, ["segment", str(photo), "--labels", "dog,chair", "--out", str(out),
                                   "--model", str(tiny_sdxl_dir), "--device", "cpu", "--no-crf"])
    assert res.exit_code == 0, res.output
    mask = read_index_png(out / "dog.png")
    assert mask.shape == src[::2, ::2].shape[:2] and set(np.unique(mask).tolist()) <= {0, 1, 2}
    assert (out / "dog_overlay.png").is_file()
    from text2mask.cli.wsss import _phrase_class_set

    t2m = Text2Mask.from_pretrained(str(tiny_sdxl_dir), _phrase_class_set("dog,chair"), MaskConfig(crf=False),
                                    device="cpu", dtype="fp32")
    assert np.array_equal(t2m(read_image(photo), [1, 2], key="dog").labels, mask)  # --no-crf: the initial labels


def test_memory_estimate_counts_every_captured_layer(sdxl):
    """One row at 1024x1024: Self of block 9 (2 heads, 2 layers, 64x64 = 4096 cells), Cross of
    blocks 2-6 (4 heads, 3 layers, 32x32 = 1024 cells, 77 tokens), fp32."""
    from text2mask.wsss.run import largest_geometry, row_bytes

    geo = largest_geometry(1024)
    assert geo.latent == (128, 128)
    scores = max(2 * 2 * 4096 ** 2, 2 * 4 * 1024 * 77)
    kept = 2 * 4096 ** 2 + 5 * 3 * 1024 * 77
    assert row_bytes(sdxl.unet, geo) == 4 * (scores + kept)
