"""Honest resume of `slime fit` (issue 21, rule 3): a fit killed with SIGKILL and run again
ends with the same parts file and history, byte for byte, as an uninterrupted one; a
checkpoint whose photos, masks, classes or settings differ is discarded with a message
naming what changed, never resumed; ``--restart`` discards a matching one."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from processes import kill_when
from text2mask.cli import app
from text2mask.io import read_image, read_index_png
from text2mask.slime import fit as FIT
from text2mask.slime.artifact import load_parts
from text2mask.slime.fit import Example, FitSettings
from text2mask.slime.segment import SegmentSettings

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples/slime-mini"
CLASSES = "background,top,bottom"
EPOCHS = 6


def child_env() -> dict:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    # One thread: several torch threads on a shared CPU run the tiny model several times slower.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def command(out: Path, model: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "text2mask", "slime", "fit", "--image", str(SAMPLES / "car.jpg"),
            "--mask", str(SAMPLES / "car.png"), "--classes", CLASSES, "--model", str(model), "--out", str(out),
            "--epochs", str(EPOCHS), "--canvas", "64", "--device", "cpu", "--no-progress", *map(str, extra)]


def outputs(out: Path) -> tuple[bytes, bytes]:
    return out.read_bytes(), out.with_name(out.name + ".history.json").read_bytes()


def test_a_fit_killed_with_sigkill_resumes_to_the_same_bytes(tiny_model_dir, tmp_path):
    ref = tmp_path / "ref" / "p.slime"
    done = subprocess.run(command(ref, tiny_model_dir), env=child_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr

    work = tmp_path / "work" / "p.slime"
    ckpt = work.with_name("p.slime.ckpt")
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(command(work, tiny_model_dir), env=child_env(), stdout=log, stderr=subprocess.STDOUT)
    try:               # the first epoch is done: kill it mid-fit
        kill_when(proc, ckpt.is_file, output=(tmp_path / "killed.log").read_text)
    finally:
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert ckpt.is_file() and not work.exists(), "killed too late to test resuming"
    kept_epoch = torch.load(ckpt, weights_only=True)["epoch"]
    assert 1 <= kept_epoch < EPOCHS

    again = subprocess.run(command(work, tiny_model_dir), env=child_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"resuming the fit after epoch {kept_epoch}" in again.stderr
    assert outputs(work) == outputs(ref)
    assert not ckpt.exists()
    assert not [p for p in work.parent.iterdir() if p.name.startswith(".")]


# -- a changed input restarts; --restart discards -----------------------------------------
@pytest.fixture()
def car():
    return Example("car", read_image(SAMPLES / "car.jpg"), read_index_png(SAMPLES / "car.png"))


def settings(**kw):
    return FitSettings(**{"epochs": 3, "select": "last", "segment": SegmentSettings(canvas=64, tile_size=64), **kw})


def messages(caplog):
    return " ".join(r.getMessage() for r in caplog.records)


@pytest.mark.usefixtures("one_thread")
def test_a_changed_mask_or_setting_restarts_the_fit_with_a_message(sd, car, tmp_path, caplog):
    ckpt = tmp_path / "p.ckpt"
    FIT.fit(sd, [car], CLASSES.split(","), settings(epochs=2), checkpoint=ckpt, progress=False)
    corrected = car.mask.copy()
    ys, xs = np.nonzero(corrected == 1)
    corrected[ys[:200], xs[:200]] = 2                   # the user fixes the mask, same file name
    assert not np.array_equal(corrected, car.mask)
    fixed = Example("car", car.rgb, corrected)
    fresh = FIT.fit(sd, [fixed], CLASSES.split(","), settings(), progress=False)
    with caplog.at_level(logging.INFO, logger="text2mask"):
        res = FIT.fit(sd, [fixed], CLASSES.split(","), settings(), checkpoint=ckpt, progress=False)
    assert "the content of example pair 'car' changed); starting over" in messages(caplog)
    assert "resuming" not in messages(caplog)
    assert torch.equal(res.cond, fresh.cond) and res.history == fresh.history

    caplog.clear()
    ckpt.unlink()
    FIT.fit(sd, [fixed], CLASSES.split(","), settings(epochs=2), checkpoint=ckpt, progress=False)
    with caplog.at_level(logging.INFO, logger="text2mask"):
        FIT.fit(sd, [fixed], CLASSES.split(","), settings(lr=0.05), checkpoint=ckpt, progress=False)
    assert "setting lr changed" in messages(caplog)


def test_photos_and_masks_read_from_files_are_fingerprinted_by_their_file_digests(tmp_path):
    import hashlib

    from text2mask.slime.examples import read_example

    ex = read_example(SAMPLES / "car.jpg", SAMPLES / "car.png", CLASSES.split(","))
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert ex.content_digest() == f"{sha(SAMPLES / 'car.jpg')}:{sha(SAMPLES / 'car.png')}"


@pytest.mark.usefixtures("one_thread")
def test_a_checkpoint_past_the_epochs_or_corrupt_is_refused(sd, car, tmp_path):
    from text2mask.errors import ConfigError, InputError

    ckpt = tmp_path / "p.ckpt"
    FIT.fit(sd, [car], CLASSES.split(","), settings(epochs=2), checkpoint=ckpt, progress=False)
    with pytest.raises(ConfigError, match="run 2 epochs, more than --epochs 1"):
        FIT.fit(sd, [car], CLASSES.split(","), settings(epochs=1), checkpoint=ckpt, progress=False)
    ckpt.write_bytes(b"garbage")
    with pytest.raises(InputError, match="--restart"):
        FIT.fit(sd, [car], CLASSES.split(","), settings(epochs=2), checkpoint=ckpt, progress=False)


def test_restart_discards_a_kept_checkpoint(tiny_model_dir, tmp_path):
    """A fit that diverges at epoch 2 keeps the checkpoint of epoch 1; run again for one
    epoch it resumes from it, or with --restart fits that epoch anew: same parts."""
    def run(out, *extra):
        return CliRunner().invoke(app, [str(a) for a in command(out, tiny_model_dir)[3:]] + list(extra))

    out = tmp_path / "p.slime"
    ckpt = out.with_name("p.slime.ckpt")
    assert run(out, "--lr", "1e20", "--epochs", "3").exit_code == 1 and ckpt.is_file()
    resumed = run(out, "--lr", "1e20", "--epochs", "1")
    assert resumed.exit_code == 0 and "resuming the fit after epoch 1" in resumed.stderr
    first = out.read_bytes()
    assert run(out, "--lr", "1e20", "--epochs", "3").exit_code == 2      # the parts file exists now
    out.unlink()
    assert run(out, "--lr", "1e20", "--epochs", "3").exit_code == 1 and ckpt.is_file()
    restarted = run(out, "--lr", "1e20", "--epochs", "1", "--restart")
    assert restarted.exit_code == 0, restarted.output
    assert "--restart: discarding the checkpoint" in restarted.stderr and "resuming" not in restarted.stderr
    assert out.read_bytes() == first and not ckpt.exists()
    assert load_parts(out).best_epoch == 0
