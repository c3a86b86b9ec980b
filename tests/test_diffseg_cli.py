"""`text2mask fewshot train --method diffseg`, then `evaluate` and `segment`, end to end on
the tiny random Kandinsky 2.2-layout model and samples/fewshot-mini: the outputs are
MEANINGLESS (random weights); the test checks files, the dispatch on fewshot.json, the
refusals, and that a training killed with SIGKILL and resumed repeats the losses of the
uninterrupted one."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from processes import kill_when
from text2mask.cli import app
from text2mask.io import read_index_png
from tiny_kandinsky import make_tiny_kandinsky

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent
VOC = REPO / "samples" / "voc-mini" / "VOC2012"
LISTS = REPO / "samples" / "fewshot-mini" / "pascal5i"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_kandinsky(tmp_path_factory.mktemp("kandinsky") / "model")


def _run(*args):
    return CliRunner().invoke(app, ["fewshot", *map(str, args)])


def _train_args(tiny_dir, out):
    return ["train", "--method", "diffseg", "--benchmark", "pascal5i", "--fold", 0, "--data-root", VOC,
            "--lists", LISTS, "--model", tiny_dir, "--epochs", 3, "--batch-size", 2, "--resolution", 128,
            "--checkpoint-every", 1, "--device", "cpu", "--no-progress", "--out", out]


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("diffseg") / "run"
    r = _run(*_train_args(tiny_dir, out))
    assert r.exit_code == 0, r.output
    return out


def test_train_writes_a_diffseg_checkpoint(trained):
    info = json.loads((trained / "fewshot.json").read_text())
    assert info["method"] == "diffseg" and info["fold"] == 0 and info["training_classes"] == [8, 9, 12, 15]
    assert info["config"]["resolution"] == 128 and info["edges"]["detector"] == "canny"
    losses = json.loads((trained / "losses.json").read_text())
    assert len(losses) == 3 * 5 and all(np.isfinite(losses))          # 10 pairs, 2 per step, 3 epochs
    assert sorted(p.name for p in trained.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (trained / "scm.safetensors").is_file() and (trained / "pam.safetensors").is_file()


def test_evaluate_and_segment_dispatch_on_the_checkpoint(trained, tmp_path):
    man = tmp_path / "episodes.jsonl"
    r = _run("episodes", "--benchmark", "pascal5i", "--fold", 0, "--shots", 1, "--data-root", VOC, "--lists", LISTS,
             "--count", 3, "--out", man)
    assert r.exit_code == 0, r.output
    ev = tmp_path / "ev"
    r = _run("evaluate", "--episodes", man, "--model", trained, "--out", ev, "--device", "cpu", "--workers", 0,
             "--visualize", 1, "--no-progress")
    assert r.exit_code == 0, r.output
    assert "MEANINGLESS" in r.output
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["fold"] == 0 and metrics["original"]["episodes"] == 3
    run_json = json.loads((ev / "run.json").read_text())
    assert run_json["model"]["family"] == "kandinsky22" and run_json["fingerprint"]["method"]["method"] == "diffseg"
    for e in [json.loads(x) for x in man.read_text().splitlines()[1:]]:
        mask = read_index_png(ev / "masks" / f"{e['id']}.png")
        with Image.open(VOC / "JPEGImages" / f"{e['query']}.jpg") as im:
            assert mask.shape == (im.height, im.width) and set(np.unique(mask)) <= {0, 1}
    assert [p.name for p in (ev / "visual").iterdir()] == ["0000.png"]
    # a second seeded manifest of the same fold: `score` gives mean ± std over the seeds
    man1, ev1 = tmp_path / "episodes-seed1.jsonl", tmp_path / "ev-seed1"
    assert _run("episodes", "--benchmark", "pascal5i", "--fold", 0, "--data-root", VOC, "--lists", LISTS, "--count", 3,
                "--seed", 1, "--out", man1).exit_code == 0
    assert _run("evaluate", "--episodes", man1, "--model", trained, "--out", ev1, "--device", "cpu", "--workers", 0,
                "--no-progress").exit_code == 0
    r = _run("score", ev, ev1)
    assert r.exit_code == 0, r.output
    m0, m1 = (json.loads((d / "metrics.json").read_text())["mIoU"] for d in (ev, ev1))
    std = abs(m0 - m1) / 2 ** 0.5
    assert f"over 2 seeded manifest(s) [0, 1]: mIoU {(m0 + m1) / 2:.1f} ± {std:.1f}%" in r.output, r.output
    r = _run("evaluate", "--episodes", man, "--model", trained, "--out", tmp_path / "ev2", "--device", "cpu",
             "--text-condition", "padded")
    assert r.exit_code == 2 and "DiffSeg" in r.output, r.output

    img = VOC / "JPEGImages" / "2007_000549.jpg"
    gt = read_index_png(VOC / "SegmentationClass" / "2007_000549.png")
    support_mask = tmp_path / "cat.png"
    Image.fromarray(np.where(gt == 8, 255, 0).astype(np.uint8)).save(support_mask)
    query = VOC / "JPEGImages" / "2007_001825.jpg"
    seg = tmp_path / "seg"
    r = _run("segment", "--support", f"{img}:{support_mask}", "--query", query, "--model", trained, "--out", seg,
             "--device", "cpu", "--visualize")
    assert r.exit_code == 0, r.output
    with Image.open(query) as im:
        assert read_index_png(seg / "2007_001825.png").shape == (im.height, im.width)
    assert (seg / "visual" / "2007_001825.png").is_file()


def test_options_of_the_other_method_are_refused(tiny_dir, tmp_path):
    r = _run(*_train_args(tiny_dir, tmp_path / "a"), "--steps", 5)
    assert r.exit_code == 2 and "--steps" in r.output and "diffews only" in r.output, r.output
    r = _run("train", "--benchmark", "pascal5i", "--fold", 0, "--data-root", VOC, "--lists", LISTS, "--model",
             tiny_dir, "--epochs", 2, "--out", tmp_path / "b", "--device", "cpu")
    assert r.exit_code == 2 and "--epochs" in r.output and "diffseg only" in r.output, r.output
    r = _run(*_train_args(tiny_dir, tmp_path / "c"), "--edges", "hed")
    assert r.exit_code == 2 and "--hed FILE" in r.output, r.output
    r = _run(*_train_args(tiny_dir, tmp_path / "d")[:-2], "--resolution", 96, "--out", tmp_path / "d")
    assert r.exit_code == 2 and "multiple of 64" in r.output, r.output
    assert not any((tmp_path / x).exists() for x in "abcd")


def test_killed_training_resumes_to_the_same_losses(trained, tiny_dir, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "text2mask", "fewshot", *map(str, _train_args(tiny_dir, out))]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_when(proc, (out / "checkpoint-1" / "step.json").is_file, output=lambda: proc.stderr.read().decode()[-2000:])
    assert proc.returncode == -signal.SIGKILL and not (out / "fewshot.json").exists()
    r = _run(*_train_args(tiny_dir, out))                    # without --resume: refused
    assert r.exit_code == 2 and "--resume" in r.output, r.output
    r = _run(*_train_args(tiny_dir, out), "--resume")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "losses.json").read_text()) == json.loads((trained / "losses.json").read_text())
    for name in ("scm.safetensors", "pam.safetensors"):
        assert (out / name).read_bytes() == (trained / name).read_bytes()


def test_a_diverging_training_exits_1_and_writes_no_checkpoint(tiny_dir, tmp_path):
    out = tmp_path / "nan"
    r = _run(*_train_args(tiny_dir, out)[:-2], "--epochs", 1, "--lr", 1e12, "--out", out)
    assert r.exit_code == 1 and "lower --lr" in r.output and "Nothing was written" in r.output, r.output
    assert not (out / "fewshot.json").exists() and not list(out.glob("*.safetensors"))
