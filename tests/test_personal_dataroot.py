"""`personalize --data-root` (issue 22, item 6): every concept of a dataset trained into
--out/<concept>, class images per class word, a rerun skips what is done, and `refer
--data-root --concepts` runs on the result."""
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from text2mask.cli import app
from text2mask.personal.concept import Concept

pytestmark = pytest.mark.usefixtures("one_thread")
SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "refer-mini"


def _run(args):
    return CliRunner().invoke(app, [*map(str, args)])


def test_personalize_every_concept_then_refer(tiny_model_dir, tmp_path):
    out = tmp_path / "trained"
    args = ["personalize", "--data-root", SAMPLE, "--out", out, "--model", tiny_model_dir, "--device", "cpu",
            "--size", "64", "--batch-size", "1", "--steps", "1", "--generate-class-images", "1", "--no-progress"]
    res = _run(args)
    assert res.exit_code == 0, res.output
    classes = {"cat-left": "cat", "cat-right": "cat", "handbag-left": "handbag", "handbag-right": "handbag"}
    for cid, cls in classes.items():
        c = Concept.load(out / cid)
        assert c.info["class"] == cls and c.info["settings"]["prior_preservation"] is True
        assert c.info["settings"]["instance_photos"] == 3
    assert sorted(p.name for p in (tmp_path / "trained-class-images").iterdir()) == ["cat", "handbag"]
    assert len(list((tmp_path / "trained-class-images" / "cat").glob("*.jpg"))) == 1
    # different photos, different concepts (one model load, K/V restored between concepts)
    assert Concept.load(out / "cat-left").digest != Concept.load(out / "cat-right").digest

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    again = _run(args)
    assert again.exit_code == 0, again.output
    assert again.output.count("already trained") == 4
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamps

    run = tmp_path / "run"
    res = _run(["refer", "--data-root", SAMPLE, "--concepts", out, "--split", "all", "--out", run, "--model",
                tiny_model_dir, "--device", "cpu", "--long-side", "128", "--workers", "0", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "metrics.json").read_text())["all"]["triplets"] == 4
