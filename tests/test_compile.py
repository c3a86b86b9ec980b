"""``--compile`` (issue 11.3): the VAE encoder through torch.compile (inductor, C++ on the
CPU). Real compilation of the tiny SD 1.x model's encoder on real VOC photos; eager
modules stay untouched; a compiled run is its own configuration.

The speed-up itself is measured on the full-size model by ``scripts/benchmark.py --only
kernels``, never here.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from text2mask.cli import app
from text2mask.errors import EXIT_CONFIG
from text2mask.io import read_image
from text2mask.modeling.kernels import COMPILED_VAE, compile_vae_encoder
from text2mask.preprocess import geometry, prepare

REPO = Path(__file__).resolve().parent.parent
VOC = REPO / "samples" / "voc-mini" / "VOC2012"
# Two padded sizes: 500x375 -> 768x576 and 375x500 -> 576x768 (one graph each).
PHOTOS = ("2007_000032", "2007_000042")

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(key: str) -> torch.Tensor:
    rgb = read_image(VOC / "JPEGImages" / f"{key}.jpg")
    return prepare(rgb, geometry(*rgb.shape[:2]))[None]


def test_compiled_posterior_matches_eager_and_leaves_the_model_eager(sd):
    fast = compile_vae_encoder(sd)
    assert fast.vae is sd.vae and fast.unet is sd.unet          # no copy
    assert sd.vae_encode is None and fast.info["compiled"] == COMPILED_VAE and "compiled" not in sd.info
    shapes = set()
    with torch.inference_mode():
        for key in PHOTOS:
            x = batch(key)
            shapes.add(tuple(x.shape))
            eager_mean, eager_std = sd.posterior(x)
            mean, std = fast.posterior(x)
            assert mean.dtype == torch.float32 and mean.shape == eager_mean.shape
            for a, b in ((mean, eager_mean), (std, eager_std)):
                assert float((a - b).abs().max() / b.abs().max()) < 1e-5
            # The eager path is still eager, bit for bit (nothing was patched).
            again, _ = sd.posterior(x)
            assert torch.equal(again, eager_mean)
    assert len(shapes) == 2


def test_compiled_run_is_its_own_configuration(tiny_model_dir, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes((VOC / "JPEGImages" / f"{PHOTOS[0]}.jpg").read_bytes())
    (tmp_path / "labels.json").write_text(json.dumps({"a.jpg": ["aeroplane"]}))
    out = tmp_path / "out"
    base = ["generate", "--dataset", "folder", "--images", str(photos), "--labels", str(tmp_path / "labels.json"),
            "--prompts", "voc", "--model", str(tiny_model_dir), "--device", "cpu", "--out", str(out),
            "--workers", "0", "--no-progress"]
    res = CliRunner().invoke(app, [*base, "--compile"])
    assert res.exit_code == 0, res.output
    run = json.loads((out / "run.json").read_text())
    assert run["fingerprint"]["model"]["compiled"] == COMPILED_VAE
    first = (out / "masks" / "a.png").read_bytes()
    # The same folder without --compile is another configuration: refused, nothing touched.
    res = CliRunner().invoke(app, base)
    assert res.exit_code == EXIT_CONFIG
    assert "configuration" in res.output
    assert (out / "masks" / "a.png").read_bytes() == first
    assert json.loads((out / "run.json").read_text())["fingerprint"]["model"]["compiled"] == COMPILED_VAE


def test_no_compiler_is_one_clear_error(tiny_model_dir, tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes((VOC / "JPEGImages" / f"{PHOTOS[0]}.jpg").read_bytes())
    (tmp_path / "labels.json").write_text(json.dumps({"a.jpg": ["aeroplane"]}))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))   # no g++, c++ or clang++ to be found
    monkeypatch.delenv("CXX", raising=False)
    res = CliRunner().invoke(app, ["generate", "--dataset", "folder", "--images", str(photos),
                                   "--labels", str(tmp_path / "labels.json"), "--prompts", "voc",
                                   "--model", str(tiny_model_dir), "--device", "cpu",
                                   "--out", str(tmp_path / "out"), "--compile"])
    assert res.exit_code == EXIT_CONFIG
    assert "C++ compiler" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


def test_compiled_scores_follow_eager(sd):
    """The whole pipeline on a real photo: the compiled encoder's maps stay close to
    eager's (random weights: nearly flat maps, so a few labels may flip)."""
    from text2mask.wsss.predictor import Text2Mask
    from text2mask.wsss.result import MaskConfig

    rgb = read_image(VOC / "JPEGImages" / f"{PHOTOS[0]}.jpg")
    eager = Text2Mask(sd, "voc", MaskConfig(samples=1))
    fast = Text2Mask(compile_vae_encoder(sd), "voc", MaskConfig(samples=1))
    plan = eager.plan([1])
    a = eager.attend([("a", rgb, plan)])[0]
    b = fast.attend([("a", rgb, plan)])[0]
    assert np.abs(a.scores - b.scores).max() < 1e-2
    assert (a.labels == b.labels).mean() > 0.99
