"""Image geometry (ALGORITHM.md section 2.1) and the crop back to the image (section 5)."""
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from text2mask.preprocess import Geometry, geometry, long_side, prepare
from text2mask.wsss.propagate import to_image

JPEGS = Path(__file__).resolve().parent.parent / "samples/voc-mini/VOC2012/JPEGImages"
PAD = (123, 117, 104)


def spec_long_side(h, w):
    """The band rule with exact rational arithmetic."""
    r = max(Fraction(h, w), Fraction(w, h))
    for bound, side in ((Fraction(16, 7), 1024), (Fraction(15, 8), 960), (Fraction(14, 8), 896),
                        (Fraction(13, 9), 832), (Fraction(12, 10), 768)):
        if r > bound:
            return side
    return 704


# (short, long) -> long side; each band at its boundary (exactly equal: the lower band) and
# one pixel above it.
BANDS = [
    ((700, 1600), 960), ((700, 1601), 1024), ((100, 1000), 1024),
    ((800, 1500), 896), ((800, 1501), 960),
    ((800, 1400), 832), ((800, 1401), 896),
    ((900, 1300), 768), ((900, 1301), 832),
    ((1000, 1200), 704), ((1000, 1201), 768),
    ((500, 500), 704), ((999, 1000), 704),
]


@pytest.mark.parametrize("short_long, side", BANDS)
def test_long_side_bands_landscape_and_portrait(short_long, side):
    short, long = short_long
    assert long_side(short, long) == side          # landscape: h = short, w = long
    assert long_side(long, short) == side          # portrait
    assert spec_long_side(short, long) == side     # the table above is the spec's rule


@pytest.mark.parametrize("short_long, side", BANDS)
def test_geometry_at_band_boundaries(short_long, side):
    short, long = short_long
    resized_short = side * short // long
    padded_short = -(-resized_short // 64) * 64
    padded_long = -(-side // 64) * 64
    land = geometry(short, long)
    assert (land.height, land.width) == (short, long)
    assert (land.resized_height, land.resized_width) == (resized_short, side)
    assert (land.padded_height, land.padded_width) == (padded_short, padded_long)
    port = geometry(long, short)
    assert (port.resized_height, port.resized_width) == (side, resized_short)
    assert (port.padded_height, port.padded_width) == (padded_long, padded_short)


def test_geometry_random_sizes_match_the_rule():
    rng = np.random.default_rng(0)
    for h, w in rng.integers(16, 2500, size=(400, 2)):
        h, w = int(h), int(w)
        side = spec_long_side(h, w)
        g = geometry(h, w)
        if w > h:
            assert (g.resized_width, g.resized_height) == (side, side * h // w)
        else:
            assert (g.resized_height, g.resized_width) == (side, side * w // h)
        for resized, padded in ((g.resized_height, g.padded_height), (g.resized_width, g.padded_width)):
            assert padded % 64 == 0 and resized <= padded < resized + 64


def test_voc_sizes():
    g = geometry(375, 500)  # 500x375 (w x h)
    assert (g.resized_width, g.resized_height) == (768, 576)
    assert (g.padded_width, g.padded_height) == (768, 576)
    assert g.latent == (72, 96)  # (h, w): a 96x72 latent
    g = geometry(281, 500)
    assert (g.resized_width, g.resized_height) == (896, 503)
    assert (g.padded_width, g.padded_height) == (896, 512)
    assert g.latent == (64, 112)
    g = geometry(500, 334)  # portrait 334x500
    assert (g.resized_width, g.resized_height) == (555, 832)
    assert (g.padded_width, g.padded_height) == (576, 832)


@pytest.mark.parametrize("name, pad_side", [("2007_000032.jpg", "bottom"), ("2007_000129.jpg", "right")])
def test_prepare_resizes_pads_and_scales(name, pad_side):
    photo = Image.open(JPEGS / name).convert("RGB")
    rgb = np.asarray(photo)
    g = geometry(*rgb.shape[:2])
    x = prepare(rgb, g)
    assert x.dtype == torch.float32 and tuple(x.shape) == (3, g.padded_height, g.padded_width)
    rh, rw = g.resized_height, g.resized_width
    assert (rh < g.padded_height) == (pad_side == "bottom") and (rw < g.padded_width) == (pad_side == "right")

    # Back to 0..255: exact integers.
    back = (x.numpy() + 1) / 2 * 255
    u8 = np.round(back).astype(np.uint8).transpose(1, 2, 0)
    assert np.abs(back - np.round(back)).max() < 1e-4

    expected = np.asarray(photo.resize((rw, rh), Image.BILINEAR))
    np.testing.assert_array_equal(u8[:rh, :rw], expected)

    pad = np.ones((g.padded_height, g.padded_width), bool)
    pad[:rh, :rw] = False
    assert pad.sum() > 0
    assert (u8[pad] == PAD).all()
    # The padding colour in [-1, 1] scaling, exactly (float32: c / 255 * 2 - 1).
    pad_value = np.float32(PAD) / np.float32(255) * np.float32(2) - np.float32(1)
    for c in range(3):
        assert (x.numpy()[c][pad] == pad_value[c]).all()
    assert x.min() >= -1 and x.max() <= 1


# -- the crop back to the image -----------------------------------------------------------

def nearest_index(n_out, n_in):
    """torch 'nearest': src = floor(dst * in / out), the scale in float32 as torch computes it."""
    src = np.floor(np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out)).astype(int)
    return np.minimum(src, n_in - 1)


def nearest(a, size):
    return a[..., nearest_index(size[0], a.shape[-2])[:, None], nearest_index(size[1], a.shape[-1])[None, :]]


def bilinear(a, size):
    """align_corners=False bilinear without antialiasing, in float64."""
    def weights(n_out, n_in):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, wy = weights(size[0], a.shape[-2])
    x0, x1, wx = weights(size[1], a.shape[-1])
    rows = a[..., y0, :] * (1 - wy)[:, None] + a[..., y1, :] * wy[:, None]
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx


def test_nearest_index_matches_torch():
    for n_in, n_out in ((52, 832), (36, 576), (555, 334), (409, 200), (28, 448), (7, 3)):
        t = torch.nn.functional.interpolate(torch.arange(n_in, dtype=torch.float32)[None, None, None],
                                            size=(1, n_out), mode="nearest")
        np.testing.assert_array_equal(t[0, 0, 0].numpy().astype(int), nearest_index(n_out, n_in))


@pytest.mark.parametrize("h, w", [(500, 334), (200, 500)])
def test_to_image_crops_padding(h, w):
    g = geometry(h, w)
    gh, gw = g.padded_height // 16, g.padded_width // 16  # the self-attention grid (latent / 2)
    classes = (3, 7, 12)
    # Grid cells lying entirely in the padding.
    pad_rows = np.arange(gh) * 16 >= g.resized_height
    pad_cols = np.arange(gw) * 16 >= g.resized_width
    padding = pad_rows[:, None] | pad_cols[None, :]
    assert padding.any() and not padding.all()

    rng = np.random.default_rng(1)
    channel = rng.integers(0, 3, size=(gh, gw))   # background, 3 or 7 on the image
    channel[padding] = 3                          # class 12 only in the padding
    scores = rng.random((4, gh, gw)) * 0.5
    scores[channel, np.arange(gh)[:, None], np.arange(gw)[None, :]] += 1.0

    labels, full = to_image(torch.from_numpy(scores).float(), classes, g)

    assert labels.shape == (h, w) and labels.dtype == np.uint8
    assert full.shape == (4, h, w) and full.dtype == np.float32
    lut = np.array([0, *classes])
    padded = nearest(lut[channel], (g.padded_height, g.padded_width))
    expected = nearest(padded[: g.resized_height, : g.resized_width], (h, w))
    np.testing.assert_array_equal(labels, expected)
    assert 12 not in labels
    assert set(np.unique(labels)) == {0, 3, 7}

    crop = bilinear(scores.astype(np.float32).astype(np.float64),
                    (g.padded_height, g.padded_width))[:, : g.resized_height, : g.resized_width]
    np.testing.assert_allclose(full, bilinear(crop, (h, w)), atol=1e-5)


def test_to_image_identity_geometry():
    g = Geometry(height=2, width=3, resized_height=2, resized_width=3, padded_height=2, padded_width=3)
    scores = torch.tensor([[[0.2, 0.9, 0.0], [0.5, 0.1, 0.3]],
                           [[0.8, 0.1, 0.0], [0.4, 0.0, 0.2]],
                           [[0.0, 0.5, 1.0], [0.6, 0.2, 0.1]]])
    labels, full = to_image(scores, (5, 9), g)
    np.testing.assert_array_equal(labels, [[5, 0, 9], [9, 9, 0]])
    np.testing.assert_array_equal(full, scores.numpy())
