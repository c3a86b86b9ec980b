"""The built-in Custom Diffusion trainer: a few steps on real photos train only the token
row and the attn2 K/V, leave the model as it was, the concept reloads, a resumed run ends
where an uninterrupted one does, the loss is diffusers', a divergence writes nothing."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from text2mask.errors import TrainingDiverged
from text2mask.modeling.loading import load
from text2mask.personal.concept import Concept
from text2mask.personal.train import TrainConfig, augment, instance_loss, train_concept, trained_names

pytestmark = pytest.mark.usefixtures("one_thread")
PHOTOS = [Path(__file__).resolve().parent.parent / "samples" / "refer-mini" / "concepts" / "cat-left" / f"view{i}.jpg"
          for i in (1, 2)]


def _cfg(**kw):
    kw = {"size": 64, "batch_size": 1, "steps": 3, "checkpoint_every": 2, **kw}
    return TrainConfig(class_name="cat", **kw)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_three_steps_train_only_the_row_and_kv_and_restore_the_model(tiny_model_dir, tmp_path):
    sd = load(str(tiny_model_dir), device="cpu", dtype="fp32")
    unet_before, text_before, vae_before = _state(sd.unet), _state(sd.text_encoder), _state(sd.vae)
    out = train_concept(sd, PHOTOS, tmp_path / "cat-left", _cfg(), show_progress=False)

    # the Python API leaves the base model's weights as they were, bit for bit
    assert all(torch.equal(v, unet_before[k]) for k, v in sd.unet.state_dict().items())
    assert all(torch.equal(v, vae_before[k]) for k, v in sd.vae.state_dict().items())
    text_after = sd.text_encoder.state_dict()
    emb = next(k for k in text_before if k.endswith("token_embedding.weight"))
    assert len(text_after[emb]) == len(text_before[emb]) + 1     # the token was added to the vocabulary
    for k, v in text_before.items():
        assert torch.equal(text_after[k][: len(v)] if k == emb else text_after[k], v), k

    names = set(trained_names(sd.unet, "crossattn_kv"))
    assert len(names) == 32
    c = Concept.load(out)
    assert c.tokens == ("<new1>",) and c.info["class"] == "cat" and c.info["settings"]["steps"] == 3
    c.check(sd)
    assert set(c.attn2) == names
    assert all(not torch.equal(c.attn2[n], unet_before[n]) for n in names)      # every K/V was trained
    init = text_before[emb][sd.tokenizer("ktn", add_special_tokens=False).input_ids[0]]
    assert not torch.equal(c.embeddings[0], init)                                  # the row was trained
    assert (tmp_path / "cat-left-checkpoints" / "step-2" / "checkpoint.json").is_file()
    with c.applied(sd):          # applying the concept is what changes the model, and only its K/V
        changed = {k for k, v in sd.unet.state_dict().items() if not torch.equal(v, unet_before[k])}
    assert changed == names


def test_resume_equals_an_uninterrupted_run_and_serves_any_longer_run(tiny_model_dir, tmp_path):
    """A step-2 checkpoint of a 4-step run, resumed with --steps 3, ends bitwise where an
    uninterrupted 3-step run ends: the draws depend on (seed, step) only."""
    sd = load(str(tiny_model_dir), device="cpu", dtype="fp32")
    train_concept(sd, PHOTOS, tmp_path / "four", _cfg(steps=4), show_progress=False)
    shutil.copytree(tmp_path / "four-checkpoints", tmp_path / "resumed-checkpoints")
    resumed = Concept.load(train_concept(sd, PHOTOS, tmp_path / "resumed", _cfg(), show_progress=False))
    straight = Concept.load(train_concept(sd, PHOTOS, tmp_path / "straight", _cfg(checkpoint_every=0),
                                          show_progress=False))
    assert torch.equal(resumed.embeddings, straight.embeddings)
    assert all(torch.equal(resumed.attn2[k], straight.attn2[k]) for k in straight.attn2)
    four = Concept.load(tmp_path / "four")
    assert not torch.equal(four.embeddings, straight.embeddings)    # step 4 did train further


@pytest.mark.parametrize("seed", range(6))
def test_augment_masks_the_pasted_area(seed):
    import random

    rgb = np.full((50, 70, 3), 200, np.uint8)
    img, mask, prefix = augment(rgb, 64, random.Random(seed))
    assert img.shape == (64, 64, 3) and mask.shape == (8, 8)
    if mask.all():
        assert prefix in ("zoomed in ", "close up ") and (img == 200).all()
    else:
        # valid cells lie inside the pasted (non-black) area
        cells = np.kron(mask, np.ones((8, 8))) > 0
        assert (img[cells] == 200).all() and prefix in ("", "a far away ", "very small ")


def test_instance_loss_is_diffusers_normalisation():
    """Σ over channels and valid cells of the squared error / number of valid cells (one
    channel), then the batch mean: computed here by plain loops."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    mask = (torch.rand(3, 5, 6, generator=g) > 0.4).float()
    p, t, m = pred.numpy().astype(np.float64), target.numpy().astype(np.float64), mask.numpy()
    per_photo = []
    for b in range(3):
        total = sum((p[b, c, y, x] - t[b, c, y, x]) ** 2 for c in range(4) for y in range(5) for x in range(6)
                    if m[b, y, x])
        per_photo.append(total / m[b].sum())
    assert instance_loss(pred, target, mask).item() == pytest.approx(np.mean(per_photo), rel=1e-6)
    # the earlier reading (divided by 4 x cells) is a quarter of it
    assert instance_loss(pred, target, mask).item() == pytest.approx(
        4 * np.mean([((p[b] - t[b]) ** 2 * m[b]).sum() / (4 * m[b].sum()) for b in range(3)]), rel=1e-6)


def test_divergence_stops_with_exit_1_and_writes_nothing(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from text2mask.cli import app

    sd = load(str(tiny_model_dir), device="cpu", dtype="fp32")
    before = _state(sd.unet)
    with pytest.raises(TrainingDiverged, match="non-finite"):
        train_concept(sd, PHOTOS, tmp_path / "api", _cfg(base_lr=1e30, steps=4), show_progress=False)
    assert not (tmp_path / "api").exists()
    assert all(torch.equal(v, before[k]) for k, v in sd.unet.state_dict().items())    # restored even then
    res = CliRunner().invoke(app, ["personalize", *map(str, PHOTOS), "--class", "cat", "--out", str(tmp_path / "cli"),
                                   "--model", str(tiny_model_dir), "--device", "cpu", "--size", "64",
                                   "--batch-size", "1", "--steps", "4", "--base-lr", "1e30", "--no-progress"])
    assert res.exit_code == 1, res.output
    assert "non-finite" in res.output and "Traceback" not in res.output
    assert not list((tmp_path / "cli").glob("*"))


def test_generate_class_images_then_train_with_prior(tiny_model_dir, tmp_path):
    """`personalize --generate-class-images N`: the base model draws the class photos into
    <out>-class-images (real sampling: 50 steps with guidance on the tiny model), training
    then uses them (prior preservation); a second call with a larger N adds only the
    missing ones and leaves the first untouched; the same seed draws the same pictures."""
    from typer.testing import CliRunner

    from text2mask.cli import app
    from text2mask.io import read_image

    def personalize(out, n, *extra):
        res = CliRunner().invoke(app, ["personalize", *map(str, PHOTOS), "--class", "cat", "--out", str(out),
                                       "--model", str(tiny_model_dir), "--device", "cpu", "--size", "64",
                                       "--batch-size", "1", "--steps", "1", "--generate-class-images", str(n),
                                       "--no-progress", *extra])
        assert res.exit_code == 0, res.output
        return res

    out = tmp_path / "cat"
    personalize(out, 2)
    folder = tmp_path / "cat-class-images"
    first = sorted(folder.iterdir())
    assert [p.name[:5] for p in first] == ["0000-", "0001-"] and all(p.suffix == ".jpg" for p in first)
    pictures = [read_image(p) for p in first]
    assert all(a.shape == (64, 64, 3) for a in pictures)
    assert not np.array_equal(pictures[0], pictures[1])          # two draws, not one twice
    assert Concept.load(out).info["settings"]["prior_preservation"] is True
    stamps = {p.name: p.stat().st_mtime_ns for p in first}

    personalize(tmp_path / "cat2", 3, "--class-images", str(folder), "--restart")
    now = sorted(folder.iterdir())
    assert len(now) == 3 and now[2].name.startswith("0002-")
    assert {p.name: p.stat().st_mtime_ns for p in now[:2]} == stamps

    personalize(tmp_path / "cat3", 2, "--class-images", str(tmp_path / "again"))
    assert [p.read_bytes() for p in sorted((tmp_path / "again").iterdir())] == [p.read_bytes() for p in first]
