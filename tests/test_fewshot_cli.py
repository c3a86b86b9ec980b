"""`text2mask fewshot` end to end on samples/fewshot-mini (real VOC photos, synthetic
HSNet-format lists) with a tiny random DiffewS checkpoint: outputs are MEANINGLESS; the
test checks files, resume, metrics and the refusals of bad input."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fewshot_models import make_fewshot_checkpoint
from text2mask.cli import app
from text2mask.io import read_index_png

REPO = Path(__file__).resolve().parent.parent
VOC = REPO / "samples" / "voc-mini" / "VOC2012"
LISTS = REPO / "samples" / "fewshot-mini" / "pascal5i"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tiny_sd2_dir, tmp_path_factory):
    return make_fewshot_checkpoint(tiny_sd2_dir, tmp_path_factory.mktemp("fs") / "ckpt")


def _run(*args):
    return CliRunner().invoke(app, ["fewshot", *map(str, args)])


def test_episodes_evaluate_resume(ckpt, tmp_path):
    man = tmp_path / "episodes.jsonl"
    r = _run("episodes", "--benchmark", "pascal5i", "--fold", 2, "--shots", 1, "--data-root", VOC,
             "--lists", LISTS, "--count", 6, "--out", man)
    assert r.exit_code == 0, r.output
    assert len(man.read_text().splitlines()) == 7
    assert _run("episodes", "--benchmark", "pascal5i", "--fold", 2, "--data-root", VOC, "--lists", LISTS,
                "--out", man).exit_code == 2            # never overwritten
    run = tmp_path / "run"
    args = ["evaluate", "--episodes", man, "--model", ckpt, "--out", run, "--device", "cpu", "--workers", 0,
            "--visualize", 2, "--no-progress"]
    r = _run(*args)
    assert r.exit_code == 0, r.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["fold"] == 2 and metrics["original"]["episodes"] == 6 and metrics["standard"] is False
    # the default headline is the paper's protocol (model resolution); the original size beside it
    assert metrics["score_at"] == "model" and metrics["mIoU"] == metrics["model"]["mIoU"]
    assert metrics["FB-IoU"] == metrics["model"]["FB-IoU"] and "mIoU" in metrics["original"]
    assert "scored at the model resolution (the paper's protocol)" in r.output and "at the original size: mIoU" in r.output
    # a random-weights run says so on the printout, in metrics.json and on every picture
    assert metrics["random_weights"] is True and "MEANINGLESS" in metrics["warning"]
    assert "RANDOM WEIGHTS" in r.output
    assert {c["class"] for c in metrics["original"]["per_class"]} == {11, 12, 13, 14, 15}
    run_json = json.loads((run / "run.json").read_text())
    assert run_json["method"] == "fewshot" and run_json["model"]["random_weights"]
    eps = [json.loads(x) for x in man.read_text().splitlines()[1:]]
    for e in eps:
        mask = read_index_png(run / "masks" / f"{e['id']}.png")
        with Image.open(VOC / "JPEGImages" / f"{e['query']}.jpg") as im:
            assert mask.shape == (im.height, im.width)
        assert set(np.unique(mask)) <= {0, 1}
        areas = json.loads((run / "areas" / f"{e['id']}.json").read_text())
        gt = read_index_png(VOC / "SegmentationClass" / f"{e['query']}.png")
        # the recorded areas are those of the written mask against the ground truth
        valid = gt != 255
        fg = gt == e["class"]
        assert areas["original"][0][1] == int(np.sum(mask.astype(bool) & fg & valid))
        assert areas["original"][1][1] == int(np.sum((mask.astype(bool) | fg) & valid))
    assert sorted(p.name for p in (run / "visual").iterdir()) == ["0000.png", "0001.png"]
    from text2mask.fewshot.visual import HEIGHT
    from text2mask.visualize import CAPTION_HEIGHT

    with Image.open(run / "visual" / "0000.png") as im:       # titles + the random-weights banner
        assert im.height == HEIGHT + 2 * CAPTION_HEIGHT
    _model_resolution_areas_match_hsnet(ckpt, eps[:2], run)
    before = {p.name: p.stat().st_mtime_ns for p in (run / "masks").iterdir()}
    r = _run(*args)                                       # resume: nothing redone
    assert r.exit_code == 0 and "6 already complete" in r.output, r.output
    assert {p.name: p.stat().st_mtime_ns for p in (run / "masks").iterdir()} == before
    # two shards into another folder, then `score`: the same numbers as the single run
    sharded = tmp_path / "sharded"
    for i in range(2):
        r = _run("evaluate", "--episodes", man, "--model", ckpt, "--out", sharded, "--device", "cpu",
                 "--workers", 0, "--shard", f"{i}/2", "--no-progress")
        assert r.exit_code == 0, r.output
    assert not (sharded / "metrics.json").exists()
    r = _run("score", sharded)
    assert r.exit_code == 0, r.output
    again = json.loads((sharded / "metrics.json").read_text())
    assert again["original"] == metrics["original"] and again["model"] == metrics["model"]


def _model_resolution_areas_match_hsnet(ckpt, eps, run):
    """areas["model"] against an independent computation: the prediction at R², the ground
    truth resized by HSNet's F.interpolate(mode='nearest'), 255 ignored, I/U by hand."""
    import torch
    import torch.nn.functional as F

    from text2mask.fewshot.checkpoint import load_diffews
    from text2mask.fewshot.model import episode_inputs
    from text2mask.io import read_image

    m = load_diffews(ckpt, device="cpu", dtype="fp32")
    r = m.config.resolution
    for e in eps:
        def labelled(name):
            return read_image(VOC / "JPEGImages" / f"{name}.jpg"), read_index_png(VOC / "SegmentationClass" / f"{name}.png")
        q_rgb, q_gt = labelled(e["query"])
        sup = [labelled(s) for s in e["supports"]]
        pred = m.predict([episode_inputs(q_rgb, [(rgb, gt == e["class"]) for rgb, gt in sup], r)])[0].mask()
        gt = F.interpolate(torch.from_numpy(q_gt.astype(np.float32))[None, None], size=(r, r), mode="nearest")[0, 0].numpy()
        valid, fg = gt != 255, gt == e["class"]
        want = [[int(np.sum(~pred & ~fg & valid)), int(np.sum(pred & fg & valid))],
                [int(np.sum((~pred | ~fg) & valid)), int(np.sum((pred | fg) & valid))]]
        assert json.loads((run / "areas" / f"{e['id']}.json").read_text())["model"] == want


def test_segment_own_photos(ckpt, tmp_path):
    img = VOC / "JPEGImages" / "2007_000549.jpg"
    gt = read_index_png(VOC / "SegmentationClass" / "2007_000549.png")
    mask = tmp_path / "cat.png"
    Image.fromarray(np.where(gt == 8, 255, 0).astype(np.uint8)).convert("RGB").save(mask)
    q = VOC / "JPEGImages" / "2007_001825.jpg"
    out = tmp_path / "seg"
    r = _run("segment", "--support", f"{img}:{mask}", "--query", q, "--model", ckpt, "--out", out,
             "--device", "cpu", "--visualize")
    assert r.exit_code == 0, r.output
    pred = read_index_png(out / "2007_001825.png")
    with Image.open(q) as im:
        assert pred.shape == (im.height, im.width)
    assert (out / "visual" / "2007_001825.png").is_file()


def test_bad_input_exits_2_and_writes_nothing(ckpt, tmp_path):
    img = VOC / "JPEGImages" / "2007_000549.jpg"
    small = tmp_path / "small.png"
    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(small)
    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros((500, 375), np.uint8)).save(empty)   # 2007_000549 is 375x500
    out = tmp_path / "seg"
    for support, message in ((f"{img}:{small}", "support mask is 10x10"), (f"{img}:{empty}", "support mask is empty")):
        r = _run("segment", "--support", support, "--query", img, "--model", ckpt, "--out", out, "--device", "cpu")
        assert r.exit_code == 2 and message in r.output, r.output
    assert not out.exists()
    man = tmp_path / "m.jsonl"
    r = _run("episodes", "--benchmark", "pascal5i", "--fold", 4, "--data-root", VOC, "--lists", LISTS, "--out", man)
    assert r.exit_code == 2 and "unknown fold 4" in r.output
    (tmp_path / "coco").mkdir()
    r = _run("episodes", "--benchmark", "coco20i", "--fold", 0, "--data-root", tmp_path / "coco", "--out", man)
    assert r.exit_code == 2 and "fold0.pkl" in r.output and "does not ship" in r.output
    assert not man.exists()
