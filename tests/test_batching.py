"""Throughput paths compute the same thing as the plain ones (issue: one UNet pass per image)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from text2mask.data.base import Dataset, Sample
from text2mask.io import read_image
from text2mask.modeling.capture import AttentionCapture
from text2mask.modeling.latents import image_seed
from text2mask.wsss.predictor import MaskConfig, Text2Mask
from text2mask.preprocess import geometry, prepare
from text2mask.wsss.run import RunOptions, generate

VOC = Path(__file__).resolve().parent.parent / "samples" / "voc-mini" / "VOC2012"
A, B = "2007_000039", "2007_000068"   # both 500 x 375 -> one padded size (768 x 576)


@pytest.fixture(scope="module")
def t2m(tiny_model_dir):
    return Text2Mask.from_pretrained(str(tiny_model_dir), "voc", MaskConfig(samples=3))


def _rows(t2m, key, rgb, samples):
    """z_t rows of one image exactly as attend() draws them (independent re-derivation)."""
    sd = t2m.sd
    post = sd.vae.encode(prepare(rgb, geometry(*rgb.shape[:2]))[None]).latent_dist
    gen = torch.Generator().manual_seed(image_seed(t2m.config.seed, key))
    z = (post.mean[0] + post.std[0] * torch.randn(post.mean.shape[1:], generator=gen)) * 0.18215
    noise = torch.randn((samples, *post.mean.shape[1:]), generator=gen)
    a = sd.alphas_cumprod[150]
    return (a.sqrt() * z + (1 - a).sqrt() * noise).float()


@torch.inference_mode()
def test_batched_ensemble_equals_samples_run_one_by_one(t2m):
    rgb = read_image(VOC / "JPEGImages" / f"{A}.jpg")
    rows = _rows(t2m, A, rgb, 3)
    text = t2m._embed(t2m.plan((20,)).prompts[0].text)
    t = torch.tensor(150)
    with AttentionCapture(t2m.sd.unet) as cap:
        batched = cap.run(rows, t, text.expand(3, -1, -1))
        for s in range(3):
            alone = cap.run(rows[s:s + 1], t, text[None])
            # Self entries are ~1/N (6e-4 here): a relative bound says more than 1e-5 absolute.
            torch.testing.assert_close(batched.self_attn[s], alone.self_attn[0], atol=1e-8, rtol=1e-4)
            for blk in batched.cross:
                torch.testing.assert_close(batched.cross[blk][s], alone.cross[blk][0], atol=1e-8, rtol=1e-4)
    # the three rows really are three different noise draws
    rel = (batched.self_attn[0] - batched.self_attn[1]).abs().max() / batched.self_attn[0].abs().max()
    assert rel > 1e-2


@torch.inference_mode()
def test_a_batch_of_two_images_equals_each_alone(t2m):
    items = [(k, read_image(VOC / "JPEGImages" / f"{k}.jpg"), t2m.plan(c)) for k, c in ((A, (20,)), (B, (3,)))]
    both = t2m.attend(items)
    for item, res in zip(items, both):
        alone = t2m.attend([item])[0]
        assert res.classes == alone.classes
        # Batched kernels sum in another order (~1e-6); min-max normalisation of the tiny
        # random model's nearly flat maps stretches that, so compare at 1e-2 and labels.
        np.testing.assert_allclose(res.scores, alone.scores, atol=1e-2, rtol=0)
        assert (res.labels == alone.labels).mean() > 0.99
    # the batch did not mix the two images up
    assert both[0].classes == (0, 20) and both[1].classes == (0, 3)


def _dataset(ids):
    from text2mask.data.voc import labels_from_mask
    from text2mask.classes import load_class_set

    samples = [Sample(i, VOC / "JPEGImages" / f"{i}.jpg",
                      labels_from_mask(VOC / "SegmentationClass" / f"{i}.png", 21)) for i in ids]
    return Dataset("voc", "train", load_class_set("voc"), samples, "test")


def test_worker_pool_writes_the_same_bytes_and_isolates_a_failure(tiny_model_dir, tmp_path):
    t2m = Text2Mask.from_pretrained(str(tiny_model_dir), "voc", MaskConfig())
    ds = _dataset([A, B])
    generate(t2m, ds, RunOptions(out=tmp_path / "inproc", workers=0, progress=False), log=lambda m: None)
    pool_out = tmp_path / "pool"
    (pool_out / "masks" / f"{A}.png").mkdir(parents=True)   # A's mask cannot be written
    summary = generate(t2m, ds, RunOptions(out=pool_out, workers=2, progress=False), log=lambda m: None)
    assert summary.done == 1 and summary.failed == 1
    assert summary.failures[0]["id"] == A and summary.failures[0]["stage"] == "crf/write"
    assert A in (pool_out / "failures.jsonl").read_text()
    for folder in ("initial", "crf", "masks"):
        assert (pool_out / folder / f"{B}.png").read_bytes() == (tmp_path / "inproc" / folder / f"{B}.png").read_bytes()
    # A's other outputs were written by the worker and match the in-process ones
    for folder in ("initial", "crf"):
        assert (pool_out / folder / f"{A}.png").read_bytes() == (tmp_path / "inproc" / folder / f"{A}.png").read_bytes()
