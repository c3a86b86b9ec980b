"""WSSS `generate` end to end on the tiny SD 2.x model (issue 9): the paper's block choice
(cross 4-8, self 11) on SD2's 16 transformer blocks with their own head counts; run.json
says which family made the masks; the masks equal the Python API's."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from text2mask.cli import app
from text2mask.io import read_image, read_index_png

IDS = ["2007_000392", "2007_000129"]  # horse + person; bicycle + person


pytestmark = pytest.mark.usefixtures("one_thread")


def test_generate_on_sd2(tmp_path, tiny_sd2_dir, make_voc_tree):
    from text2mask import MaskConfig, Text2Mask

    voc = make_voc_tree(tmp_path / "VOC2012", IDS)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["generate", "--data-root", str(voc), "--model", str(tiny_sd2_dir), "--out", str(out),
                                   "--workers", "0", "--no-progress", "--device", "cpu", "--dtype", "fp32"])
    assert res.exit_code == 0, res.output
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["family"] == "sd2" and run["status"] == "complete"
    t2m = Text2Mask.from_pretrained(str(tiny_sd2_dir), "voc", MaskConfig(), device="cpu", dtype="fp32")
    for i in IDS:
        photo = read_image(voc / "JPEGImages" / f"{i}.jpg")
        mask = read_index_png(out / "masks" / f"{i}.png")
        assert mask.shape == photo.shape[:2]
        gt_classes = {int(v) for v in np.unique(read_index_png(voc / "SegmentationClass" / f"{i}.png"))} - {0, 255}
        assert set(np.unique(mask).tolist()) <= {0, 255} | gt_classes
        api = t2m(photo, sorted(gt_classes), key=i)
        assert np.array_equal(api.mask, mask) and np.array_equal(api.labels, read_index_png(out / "initial" / f"{i}.png"))
    assert "mIoU" in json.loads((out / "metrics.json").read_text())["crf"]
