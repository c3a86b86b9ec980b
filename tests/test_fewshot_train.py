"""The DiffewS trainer on the tiny random SD2 model at 64²: the loss falls, one episode
overfits, gradients reach conv_in_ref through the support pass's K/V, a resumed run
repeats the uninterrupted run's losses, and the final checkpoint loads for evaluation."""
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from text2mask.fewshot.checkpoint import load_diffews, read_info
from text2mask.fewshot.episodes import BENCHMARKS
from text2mask.fewshot.model import FewShotConfig
from text2mask.fewshot.train import TrainConfig, draw_batch, episode_loss, initial_model, train, training_data

REPO = Path(__file__).resolve().parent.parent
VOC = REPO / "samples" / "voc-mini" / "VOC2012"
LISTS = REPO / "samples" / "fewshot-mini" / "pascal5i"
FS = FewShotConfig(resolution=64, text_condition="padded")
pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = TrainConfig(steps=6, grad_accum=1, lr=1e-4, max_shots=2, checkpoint_every=3, fewshot=FS)


@pytest.fixture(scope="module")
def data():
    return training_data(BENCHMARKS["pascal5i"], VOC, LISTS, fold=0)


@pytest.fixture(scope="module")
def full_run(tiny_sd2_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    return out, train(str(tiny_sd2_dir), data, out, CONFIG, device="cpu", progress=False)


def test_training_data_holds_only_training_classes(data):
    assert sorted(data.lists.per_class) == [8, 9, 12, 15]      # fold 0 tests classes 1..5


def test_one_episode_overfits_and_gradients_reach_the_support_pass(tiny_sd2_dir, data):
    model, _ = initial_model(str(tiny_sd2_dir), "cpu", FS)
    batch = draw_batch(data, np.random.default_rng(0), 1, 2, 64)
    params = list(model.net.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for i in range(25):
        loss = episode_loss(model, model.net, batch, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        if i == 0:
            # conv_in_ref is used by the support pass only, whose output is discarded: its
            # gradient flows through the support keys/values stored for the query pass.
            g = model.net.conv_in_ref.weight.grad
            assert g is not None and g.abs().sum() > 0
            attn1 = model.net.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
            assert attn1.to_k.weight.grad.abs().sum() > 0 and attn1.to_v.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses


def test_loss_falls(full_run, tiny_sd2_dir, data, tmp_path):
    _, losses = full_run
    assert len(losses) == 6 and all(np.isfinite(losses))
    longer = train(str(tiny_sd2_dir), data, tmp_path / "long", replace(CONFIG, steps=24, lr=1e-3,
                   checkpoint_every=100), device="cpu", progress=False)
    assert np.mean(longer[-6:]) < 0.5 * np.mean(longer[:6]), longer


def test_resume_repeats_the_next_losses(full_run, tiny_sd2_dir, data, tmp_path):
    out, losses = full_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-3", resumed / "checkpoint-3")
    shutil.copy(out / "train.json", resumed / "train.json")
    again = train(str(tiny_sd2_dir), data, resumed, CONFIG, resume=True, device="cpu", progress=False)
    assert again == losses[3:]


def test_final_checkpoint_loads_for_evaluation(full_run):
    out, _ = full_run
    info = read_info(out)
    assert (info["benchmark"], info["fold"], info["max_shots"], info["text_condition"]) == ("pascal5i", 0, 2, "padded")
    assert info["training_classes"] == [8, 9, 12, 15]
    m = load_diffews(out, device="cpu", dtype="fp32")
    rgb = np.zeros((30, 40, 3), np.uint8)
    mask = np.zeros((30, 40), bool)
    mask[5:20, 5:30] = True
    from text2mask.fewshot.model import episode_inputs

    assert m.predict([episode_inputs(rgb, [(rgb, mask)], 64)])[0].score.shape == (64, 64)


def test_rerun_without_resume_is_refused(full_run, tiny_sd2_dir, data):
    from text2mask.errors import ConfigMismatch

    out, _ = full_run
    with pytest.raises(ConfigMismatch, match="--resume"):
        train(str(tiny_sd2_dir), data, out, CONFIG, device="cpu", progress=False)


# --- honest resume: a real process killed with SIGKILL, then resumed ----------------------

def _cli_train(root, lists, model, out, *extra):
    """`fewshot train` as CONFIG (same steps, lr, shots, checkpoints, resolution, seed)."""
    return ["fewshot", "train", "--benchmark", "pascal5i", "--fold", "0", "--data-root", str(root),
            "--lists", str(lists), "--model", str(model), "--out", str(out), "--steps", "6", "--grad-accum", "1",
            "--lr", "1e-4", "--max-shots", "2", "--checkpoint-every", "3", "--resolution", "64",
            "--device", "cpu", "--no-progress", *extra]


def _weights(folder):
    from safetensors.torch import load_file

    return {**load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")),
            **{f"conv_in_ref.{k}": v for k, v in load_file(str(folder / "support_conv_in.safetensors")).items()}}


def test_sigkill_then_resume_equals_uninterrupted_and_changed_inputs_are_refused(
        full_run, tiny_sd2_dir, make_voc_tree, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from processes import kill_when
    from typer.testing import CliRunner

    from text2mask.cli import app

    # a copy of the training data (fold 0 trains on the trn lists of folds 1..3)
    ids = sorted({line.split("__")[0] for f in (1, 2, 3)
                  for line in (LISTS / "trn" / f"fold{f}.txt").read_text().split()})
    root = make_voc_tree(tmp_path / "VOC2012", ids)
    shutil.copytree(LISTS, tmp_path / "lists")
    out = tmp_path / "killed"
    args = _cli_train(root, tmp_path / "lists", tiny_sd2_dir, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}        # as this module's one_thread
    proc = subprocess.Popen([sys.executable, "-m", "text2mask", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=REPO, env=env)
    kill_when(proc, (out / "checkpoint-3" / "step.json").is_file, output=lambda: proc.stderr.read().decode()[-2000:])
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (out / "fewshot.json").exists()                 # killed before the end
    r = subprocess.run([sys.executable, "-m", "text2mask", *args, "--resume"], capture_output=True, text=True,
                       cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stderr
    # the same weights, bit for bit, as the uninterrupted in-process run (one process each)
    whole, resumed = _weights(full_run[0]), _weights(out)
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)

    runner = CliRunner()
    r = runner.invoke(app, [*args, "--resume"])
    assert r.exit_code == 0 and "nothing to do" in r.output, r.output
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "pass --resume" in r.output, r.output
    r = runner.invoke(app, [*_cli_train(root, tmp_path / "lists", tiny_sd2_dir, out, "--lr", "2e-4"), "--resume"])
    assert r.exit_code == 2 and "--lr (0.0001 -> 0.0002)" in r.output, r.output
    changed = tmp_path / "model"
    shutil.copytree(tiny_sd2_dir, changed)
    r = runner.invoke(app, [*_cli_train(root, tmp_path / "lists", changed, out), "--resume"])
    assert r.exit_code == 0, r.output                          # a copy is the same model: its content is
    (changed / "unet" / "config.json").write_text((changed / "unet" / "config.json").read_text() + "\n")
    r = runner.invoke(app, [*_cli_train(root, tmp_path / "lists", changed, out), "--resume"])
    assert r.exit_code == 2 and "the initial model (--model)" in r.output, r.output
    mask = root / "SegmentationClass" / f"{ids[0]}.png"
    os.utime(mask, ns=(mask.stat().st_atime_ns, mask.stat().st_mtime_ns + 10**9))
    r = runner.invoke(app, [*args, "--resume"])
    assert r.exit_code == 2 and "the listed images or masks" in r.output, r.output
    after = _weights(out)                                       # nothing rewritten
    assert all(torch.equal(after[k], resumed[k]) for k in resumed)


def test_ctrl_c_finishes_the_step_keeps_it_and_resume_repeats_the_losses(full_run, tiny_sd2_dir, data, tmp_path,
                                                                         monkeypatch):
    """A real SIGINT during step 2 (checkpoints every 3): step 2 is finished and written as
    checkpoint-2, then KeyboardInterrupt; --resume continues from it with the losses of the
    uninterrupted run."""
    import os
    import signal

    import text2mask.fewshot.train as T

    out, losses = full_run
    real, calls = T.episode_loss, []

    def loss_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "episode_loss", loss_then_ctrl_c)
    stopped = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        train(str(tiny_sd2_dir), data, stopped, CONFIG, device="cpu", progress=False)
    assert len(calls) == 2 and (stopped / "checkpoint-2").is_dir() and not (stopped / "checkpoint-3").exists()
    monkeypatch.setattr(T, "episode_loss", real)
    again = train(str(tiny_sd2_dir), data, stopped, CONFIG, resume=True, device="cpu", progress=False)
    assert again == losses[2:]
