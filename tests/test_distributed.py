"""Scale-out: several processes (torchrun, gloo on CPU) and --shard job arrays over one folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from text2mask.wsss.run import shard_of

VOC = Path(__file__).resolve().parent.parent / "samples" / "voc-mini" / "VOC2012"
# Four real photos; the shard hash puts two on each of 2 ranks.
IDS = ["2007_000032", "2007_000033", "2007_000039", "2007_000063"]


@pytest.fixture(scope="module")
def voc_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc") / "VOC2012"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for sub in ("JPEGImages", "SegmentationClass"):
        (root / sub).symlink_to(VOC / sub)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(IDS) + "\n")
    return root


def _env():
    # Thread count changes float summation order; torchrun pins 1 thread per process, so
    # every run here does too (see README, Determinism).
    repo = str(Path(__file__).resolve().parent.parent)   # this checkout's text2mask, installed or not
    path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}


def _generate(args, out, model, launcher, root):
    cmd = [*launcher, "-m", "text2mask", "generate", "--data-root", str(root), "--split", "train", "--model", str(model), "--out", str(out), "--workers", "0", "--no-progress", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)


def _launcher(name: str, n: int) -> tuple[str, ...]:
    """The README's launch commands (python -m form, so the venv's interpreter is used)."""
    port = str(29500 + os.getpid() % 1000)
    if name == "accelerate":
        return (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port)
    return (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port", port)


def _pngs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/*.png"))}


@pytest.fixture(scope="module")
def reference(tiny_model_dir, voc_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out"
    res = _generate([], out, tiny_model_dir, (sys.executable,), voc_tree)
    assert res.returncode == 0, res.stderr
    assert len(_pngs(out)) == 12
    return out


def test_the_split_is_balanced_for_these_ids():
    assert sorted(shard_of(i, 2) for i in IDS) == [0, 0, 1, 1]


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_processes_equal_one_process(launcher, reference, tiny_model_dir, voc_tree, tmp_path):
    out = tmp_path / "two"
    res = _generate([], out, tiny_model_dir, _launcher(launcher, 2), voc_tree)
    assert res.returncode == 0, res.stderr
    assert _pngs(out) == _pngs(reference)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["run"]["done"] == 4 and run["run"]["total"] == 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 4
    assert metrics["crf"]["mIoU"] == json.loads((reference / "metrics.json").read_text())["crf"]["mIoU"]
    assert res.stderr.count("loading ") == 1          # one voice: the main process
    assert res.stderr.count("done: 4 written") == 1


def test_two_shards_equal_one_process(reference, tiny_model_dir, voc_tree, tmp_path):
    out = tmp_path / "shards"
    for i in range(2):
        res = _generate(["--shard", f"{i}/2"], out, tiny_model_dir, (sys.executable,), voc_tree)
        assert res.returncode == 0, res.stderr
        assert "2 written" in res.stderr
    assert _pngs(out) == _pngs(reference)
    assert sorted(p.name for p in out.glob("failures*.jsonl")) == ["failures-shard0of2.jsonl", "failures-shard1of2.jsonl"]


def test_relaunch_with_one_process_after_one_rank_finished(reference, tiny_model_dir, voc_tree, tmp_path):
    out = tmp_path / "resumed"
    # what a 2-process launch leaves when rank 0 finished and rank 1 was killed at once
    res = _generate(["--shard", "0/2"], out, tiny_model_dir, (sys.executable,), voc_tree)
    assert res.returncode == 0, res.stderr
    res = _generate([], out, tiny_model_dir, (sys.executable,), voc_tree)
    assert res.returncode == 0, res.stderr
    assert "resuming: 2 of 4 images already complete" in res.stderr
    assert _pngs(out) == _pngs(reference)
