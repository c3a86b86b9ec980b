"""The built-in Custom Diffusion trainer: a few steps on real photos change only the
token row and the attn2 K/V, the concept reloads, and a resumed run ends where an
uninterrupted one does."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from text2mask.modeling.loading import load
from text2mask.personal.concept import Concept
from text2mask.personal.train import TrainConfig, augment, train_concept, trained_names

PHOTOS = [Path(__file__).resolve().parent.parent / "samples" / "refer-mini" / "concepts" / "cat-left" / f"view{i}.jpg"
          for i in (1, 2)]


def _cfg(**kw):
    return TrainConfig(class_name="cat", size=64, batch_size=1, steps=3, checkpoint_every=2, **kw)


def test_three_steps_change_only_the_row_and_kv(tiny_model_dir, tmp_path):
    sd = load(str(tiny_model_dir), device="cpu", dtype="fp32")
    unet_before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    text_before = {k: v.clone() for k, v in sd.text_encoder.state_dict().items()}
    vae_before = {k: v.clone() for k, v in sd.vae.state_dict().items()}
    out = train_concept(sd, PHOTOS, tmp_path / "cat-left", _cfg(), show_progress=False)

    names = set(trained_names(sd.unet, "crossattn_kv"))
    assert len(names) == 32
    changed = {k for k, v in sd.unet.state_dict().items() if not torch.equal(v, unet_before[k])}
    assert changed == names
    text_after = sd.text_encoder.state_dict()
    emb = next(k for k in text_before if k.endswith("token_embedding.weight"))
    assert len(text_after[emb]) == len(text_before[emb]) + 1     # the token's row was added
    for k, v in text_before.items():
        after = text_after[k][: len(v)] if k == emb else text_after[k]
        assert torch.equal(after, v), k
    assert all(torch.equal(v, vae_before[k]) for k, v in sd.vae.state_dict().items())

    c = Concept.load(out)
    assert c.tokens == ("<new1>",) and c.info["class"] == "cat" and c.info["settings"]["steps"] == 3
    c.check(sd)
    assert set(c.attn2) == names and all(torch.equal(c.attn2[n], sd.unet.get_parameter(n)) for n in names)
    init = text_before[emb][sd.tokenizer("ktn", add_special_tokens=False).input_ids[0]]
    assert not torch.equal(c.embeddings[0], init)            # the row was trained
    assert (tmp_path / "cat-left-checkpoints" / "step-2").is_dir()

    # a second run finds the step-2 checkpoint and does only the remaining step
    fresh = load(str(tiny_model_dir), device="cpu", dtype="fp32")
    shutil.copytree(tmp_path / "cat-left-checkpoints", tmp_path / "again-checkpoints")
    before_fresh = {n: fresh.unet.get_parameter(n).clone() for n in names}
    resumed = Concept.load(train_concept(fresh, PHOTOS, tmp_path / "again", _cfg(), show_progress=False))
    assert resumed.info["settings"]["steps"] == 3
    assert all(not torch.equal(resumed.attn2[n], before_fresh[n]) for n in names)


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
