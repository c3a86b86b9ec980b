"""Latents and draws: the default per-(seed, image id) draws, injected draws against an
independent float64 computation of z_t, save/replay, and bit-identical fresh processes."""
import hashlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from text2mask.errors import InputError
from text2mask.io import read_image
from text2mask.modeling.latents import Draws, image_seed, load_draws, save_draws
from text2mask.preprocess import geometry, prepare
from text2mask.wsss.predictor import MaskConfig, Text2Mask

ROOT = Path(__file__).resolve().parent.parent
KEY = "2007_000039"
PHOTO = ROOT / f"samples/voc-mini/VOC2012/JPEGImages/{KEY}.jpg"
LABELS = [13, 15]
SAMPLES = 2


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def t2m(sd):
    return Text2Mask(sd, "voc", MaskConfig(samples=SAMPLES, crf=False))


@pytest.fixture(scope="module")
def item(t2m):
    rgb = read_image(PHOTO)
    return KEY, rgb, t2m.plan(LABELS)


@pytest.fixture(scope="module")
def default_run(t2m, item):
    """(result, UNet input latents) with the default draws, computed once."""
    return unet_inputs(t2m, [item])


@pytest.fixture(scope="module")
def latent_shape(item):
    return (4, *geometry(*item[1].shape[:2]).latent)


def unet_inputs(t2m, items, draws=None):
    """attend()'s result and the latents its UNet call received."""
    seen = []
    handle = t2m.sd.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        out = t2m.attend(items, draws)
    finally:
        handle.remove()
    return out[0], seen[0]


def test_default_draws_are_the_seeded_stream(latent_shape):
    """eps0 first, then the per-sample noise, from one generator seeded by (seed, id)."""
    gen = torch.Generator().manual_seed(image_seed(0, KEY))
    eps0 = torch.randn(latent_shape, generator=gen)
    noise = torch.randn((SAMPLES, *latent_shape), generator=gen)
    d = Draws.default(0, KEY, latent_shape, SAMPLES)
    assert torch.equal(d.eps0, eps0) and torch.equal(d.noise, noise)
    assert image_seed(0, KEY) == int.from_bytes(hashlib.sha256(f"0:{KEY}".encode()).digest()[:8], "little") & (2**63 - 1)


def test_explicit_default_draws_change_nothing(t2m, item, latent_shape, default_run):
    plain, z_plain = default_run
    given, z_given = unet_inputs(t2m, [item], {KEY: Draws.default(0, KEY, latent_shape, SAMPLES)})
    assert torch.equal(z_plain, z_given) and plain.scores.tobytes() == given.scores.tobytes()


def test_injected_draws_follow_the_formula(t2m, item, latent_shape, default_run):
    """z_t = sqrt(a_t) (mean + std eps0) scale + sqrt(1 - a_t) eps, recomputed in float64
    from the VAE's own logvar and the scheduler's betas."""
    from diffusers import DDPMScheduler

    g = torch.Generator().manual_seed(7)
    draws = Draws(torch.randn(latent_shape, generator=g), torch.randn((SAMPLES, *latent_shape), generator=g))
    result, z_t = unet_inputs(t2m, [item], {KEY: draws})
    sd, plan = t2m.sd, item[2]
    assert sd.latent_scale == 0.18215
    x = prepare(item[1], geometry(*item[1].shape[:2]))[None]
    with torch.no_grad():
        dist = sd.vae.encode(x).latent_dist
    mean, std = dist.mean.double()[0], torch.exp(0.5 * dist.logvar.double())[0]
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    a = torch.cumprod(1 - betas, 0)[150]
    expected = a.sqrt() * (mean + std * draws.eps0.double()) * 0.18215 + (1 - a).sqrt() * draws.noise.double()
    assert z_t.shape == (len(plan.prompts) * SAMPLES, *latent_shape)
    torch.testing.assert_close(z_t[:SAMPLES].double(), expected, rtol=0, atol=1e-5)
    default, _ = default_run
    assert np.abs(result.scores - default.scores).max() > 1e-4  # the draws do matter
    assert DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod[150] \
        == pytest.approx(float(a), rel=1e-6)


def test_saved_draws_replay_byte_for_byte(t2m, item, latent_shape, tmp_path):
    g = torch.Generator().manual_seed(11)
    draws = {KEY: Draws(torch.randn(latent_shape, generator=g), torch.randn((SAMPLES, *latent_shape), generator=g)),
             "other/id with space": Draws.default(3, "x", (4, 2, 3), 1)}
    save_draws(tmp_path / "draws.safetensors", draws)
    back = load_draws(tmp_path / "draws.safetensors")
    assert back.keys() == draws.keys()
    for k in draws:
        assert back[k].eps0.numpy().tobytes() == draws[k].eps0.numpy().tobytes()
        assert back[k].noise.numpy().tobytes() == draws[k].noise.numpy().tobytes()
    first, _ = unet_inputs(t2m, [item], draws)
    again, _ = unet_inputs(t2m, [item], back)
    assert first.scores.tobytes() == again.scores.tobytes() and first.labels.tobytes() == again.labels.tobytes()
    draws[KEY].save(tmp_path / "one.safetensors")
    one = Draws.load(tmp_path / "one.safetensors")
    assert torch.equal(one.eps0, draws[KEY].eps0) and torch.equal(one.noise, draws[KEY].noise)
    with pytest.raises(InputError, match="holds the draws of 2 images"):
        Draws.load(tmp_path / "draws.safetensors")


def test_draws_of_the_wrong_shape_are_refused(t2m, item, latent_shape):
    bad = Draws(torch.zeros(latent_shape), torch.zeros((SAMPLES + 1, *latent_shape)))
    with pytest.raises(InputError, match=f"draws for '{KEY}'.*noise \\(3, 4, 72, 96\\).*with 2 sample"):
        t2m.attend([item], {KEY: bad})
    with pytest.raises(InputError, match="cannot read draws"):
        load_draws(PHOTO)


FRESH = """
import hashlib, sys
import numpy as np, torch
from text2mask.io import read_image
from text2mask.modeling.latents import posterior
from text2mask.preprocess import geometry, prepare
from text2mask.wsss.predictor import MaskConfig, Text2Mask

t2m = Text2Mask.from_pretrained(sys.argv[1], "voc", MaskConfig(samples=2), device="cpu", dtype="fp32")
rgb = read_image(sys.argv[2])
with torch.no_grad():
    mean, std = posterior(t2m.sd.vae, prepare(rgb, geometry(*rgb.shape[:2]))[None])
r = t2m(rgb, [13, 15], key=sys.argv[3])
h = lambda a: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
print(h(mean.numpy()), h(std.numpy()), h(r.scores), h(r.mask))
"""


def test_fresh_processes_agree_bit_for_bit(tiny_model_dir):
    """Issue 10 item 2: the same photo's posterior and full mask in 8 fresh processes
    (2 at a time, with their default thread count) are byte-identical."""
    def run(_):
        r = subprocess.run([sys.executable, "-c", FRESH, str(tiny_model_dir), str(PHOTO), KEY],
                           capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.split()

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, range(8)))
    assert all(len(r) == 4 for r in results)
    assert len({tuple(r) for r in results}) == 1, results


def test_square_input_squashes_the_photo(sd):
    """SLiMe/DiffewS input: the whole photo squashed to size x size, in [-1, 1]; its latent is size/8."""
    from PIL import Image

    from text2mask.preprocess import prepare_square

    rgb = read_image(PHOTO)  # 500 x 375
    x = prepare_square(rgb, 64)
    expected = np.asarray(Image.fromarray(rgb).resize((64, 64), Image.BILINEAR)).astype(np.float64) / 255 * 2 - 1
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert sd.vae.encode(x[None]).latent_dist.mean.shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="multiple of 8"):
        prepare_square(rgb, 500)
