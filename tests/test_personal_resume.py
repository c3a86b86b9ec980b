"""Honest resume of `personalize` (issue 21, rule 3): a run killed with SIGKILL and resumed
ends bitwise where an uninterrupted run ends; a checkpoint of other photos, another class,
changed photo bytes or a changed setting is never resumed; --steps below a kept checkpoint
and a corrupt checkpoint are refused with exit 2 and one line."""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from processes import kill_when
from text2mask.cli import app
from text2mask.modeling.loading import load
from text2mask.personal.concept import Concept
from text2mask.personal.train import TrainConfig, train_concept

pytestmark = pytest.mark.usefixtures("one_thread")
CONCEPTS = Path(__file__).resolve().parent.parent / "samples" / "refer-mini" / "concepts"
CAT, OTHER = CONCEPTS / "cat-left", CONCEPTS / "cat-right"
FAST = ["--device", "cpu", "--size", "64", "--batch-size", "1", "--no-progress"]


def _command(model, out, *extra):
    return [sys.executable, "-m", "text2mask", "personalize", str(CAT), "--class", "cat", "--out", str(out),
            "--model", str(model), *FAST, *extra]


def _env():
    # one thread in every process: the same float reductions in each run
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _same(a: Concept, b: Concept) -> bool:
    return torch.equal(a.embeddings, b.embeddings) and set(a.attn2) == set(b.attn2) \
        and all(torch.equal(a.attn2[k], b.attn2[k]) for k in a.attn2)


def test_sigkill_then_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    out = tmp_path / "killed"
    checkpoints = tmp_path / "killed-checkpoints"
    proc = subprocess.Popen(_command(tiny_model_dir, out, "--steps", "8", "--checkpoint-every", "1"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_when(proc, (checkpoints / "step-2").is_dir, seconds=300, output=lambda: proc.stderr.read().decode())
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "concept.json").exists()           # killed mid-training
    kept = sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step-"))
    assert kept and "step-8" not in kept

    resumed = subprocess.run(_command(tiny_model_dir, out, "--steps", "8", "--checkpoint-every", "1"), env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    straight = subprocess.run(_command(tiny_model_dir, tmp_path / "straight", "--steps", "8", "--checkpoint-every",
                                       "0"), env=_env(), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr
    assert _same(Concept.load(out), Concept.load(tmp_path / "straight"))
    # the weights file is the same bytes too
    name = "pytorch_custom_diffusion_weights.safetensors"
    assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()


@pytest.fixture(scope="module")
def kept(tiny_model_dir, tmp_path_factory):
    """A concept folder whose step-2 checkpoint is kept (cat-left photos, class cat, 4 steps)."""
    root = tmp_path_factory.mktemp("kept")
    sd = load(str(tiny_model_dir), device="cpu", dtype="fp32")
    cfg = TrainConfig(class_name="cat", size=64, batch_size=1, steps=4, checkpoint_every=2)
    train_concept(sd, [CAT], root / "cat", cfg, show_progress=False)
    assert (root / "cat-checkpoints" / "step-2").is_dir()
    return root / "cat-checkpoints"


def _personalize(args):
    return CliRunner().invoke(app, ["personalize", *map(str, args)])


def _with_checkpoints(kept, tmp_path, name):
    shutil.copytree(kept, tmp_path / f"{name}-checkpoints")
    return tmp_path / name


# --model that does not exist: the refusal must come before the model would load.
NO_MODEL = ["--model", "/nonexistent/model-folder"]


@pytest.mark.parametrize("case", ["other-photos", "other-class", "other-seed", "other-lr", "steps-below"])
def test_a_checkpoint_of_other_inputs_is_refused_before_the_model_loads(kept, tmp_path, case):
    out = _with_checkpoints(kept, tmp_path, "out")
    photos, cls, extra = CAT, "cat", ["--steps", "4"]
    if case == "other-photos":
        photos = OTHER
    elif case == "other-class":
        cls = "dog"
    elif case == "other-seed":
        extra += ["--seed", "1"]
    elif case == "other-lr":
        extra += ["--base-lr", "2e-5"]
    else:
        extra = ["--steps", "1"]
    res = _personalize([photos, "--class", cls, "--out", out, *FAST, *NO_MODEL, *extra])
    assert res.exit_code == 2, res.output
    want = {"other-photos": "instance_photos", "other-class": "class", "other-seed": "settings.seed",
            "other-lr": "settings.base_lr", "steps-below": "--steps 1 is below the kept checkpoint"}[case]
    assert want in res.output and "Traceback" not in res.output, res.output
    assert not (out / "concept.json").exists()


def test_changed_photo_bytes_are_refused(kept, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(CAT, photos)
    out = _with_checkpoints(kept, tmp_path, "out")
    ok = _personalize([photos, "--class", "cat", "--out", out, *FAST, *NO_MODEL, "--steps", "4"])
    assert "other inputs" not in ok.output          # same bytes: accepted (then the missing model stops it)
    first = sorted(photos.iterdir())[0]
    first.write_bytes(first.read_bytes()[:-10] + b"0123456789")
    res = _personalize([photos, "--class", "cat", "--out", out, *FAST, *NO_MODEL, "--steps", "4"])
    assert res.exit_code == 2 and "instance_photos" in res.output, res.output


def test_restart_discards_a_foreign_checkpoint_and_trains(kept, tmp_path, tiny_model_dir):
    out = _with_checkpoints(kept, tmp_path, "out")
    res = _personalize([OTHER, "--class", "cat", "--out", out, *FAST, "--model", tiny_model_dir, "--steps", "1",
                        "--restart"])
    assert res.exit_code == 0, res.output
    assert not list((tmp_path / "out-checkpoints").glob("step-*"))
    assert Concept.load(out).info["settings"]["steps"] == 1


def test_a_corrupt_checkpoint_is_refused_naming_file_and_field(kept, tmp_path, tiny_model_dir):
    out = _with_checkpoints(kept, tmp_path, "out")
    state = tmp_path / "out-checkpoints" / "step-2" / "trained.safetensors"
    tensors = load_file(str(state))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(state))
    res = _personalize([CAT, "--class", "cat", "--out", out, *FAST, "--model", tiny_model_dir, "--steps", "4"])
    assert res.exit_code == 2, res.output
    assert str(state) in res.output and key in res.output and "non-finite" in res.output


def test_ctrl_c_finishes_the_step_keeps_it_and_the_rerun_ends_where_an_uninterrupted_run_ends(
        tiny_model_dir, tmp_path, monkeypatch):
    """A real SIGINT to this process during step 3 (of 6, no periodic checkpoints): the step
    is finished and written as step-3, KeyboardInterrupt follows, and the rerun resumes from
    it to the bytes of a run never interrupted."""
    import text2mask.personal.train as T

    cfg = TrainConfig(class_name="cat", size=64, batch_size=1, steps=6, checkpoint_every=0)
    straight = train_concept(load(str(tiny_model_dir), device="cpu", dtype="fp32"), [CAT], tmp_path / "straight",
                             cfg, show_progress=False)
    real_loss, calls = T._loss, []

    def loss_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)       # arrives inside step 3
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(T, "_loss", loss_then_ctrl_c)
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        train_concept(load(str(tiny_model_dir), device="cpu", dtype="fp32"), [CAT], out, cfg, show_progress=False)
    assert len(calls) == 3                            # step 3 finished, step 4 never began
    assert sorted(p.name for p in (tmp_path / "stopped-checkpoints").iterdir() if p.name.startswith("step-")) \
        == ["step-3"]
    assert not (out / "concept.json").exists()
    monkeypatch.setattr(T, "_loss", real_loss)
    train_concept(load(str(tiny_model_dir), device="cpu", dtype="fp32"), [CAT], out, cfg, show_progress=False)
    name = "pytorch_custom_diffusion_weights.safetensors"
    assert (out / name).read_bytes() == (straight / name).read_bytes()
