"""SLiMe's training augmentation against the official albumentations 1.3.0 pipeline
(independent computations), on a real photo and its part mask (samples/slime-mini)."""
import math
from pathlib import Path

import numpy as np
import pytest

from text2mask.io import read_image, read_index_png
from text2mask.slime import augment as A

SAMPLES = Path(__file__).resolve().parent.parent / "samples/slime-mini"


def photo():
    return read_image(SAMPLES / "car.jpg"), read_index_png(SAMPLES / "car.png")


def test_blur_kernel_sizes_follow_the_albumentations_probabilities():
    """randrange(1, 6) with even sizes moved up: 1: 0.2, 3: 0.4, 5: 0.4. Over n draws each
    share lies within 5 binomial standard deviations sqrt(p (1 - p) / n) of p."""
    rng = np.random.default_rng(123)
    n = 20000
    draws = np.array([A.blur_kernel(rng) for _ in range(n)])
    assert set(np.unique(draws)) == {1, 3, 5}
    for k, p in ((1, 0.2), (3, 0.4), (5, 0.4)):
        share = float((draws == k).mean())
        assert abs(share - p) < 5 * math.sqrt(p * (1 - p) / n), (k, share)


def test_blur_is_the_binomial_kernel_of_opencv_sigma_zero():
    """An impulse of 255 in a flat 0 image spreads as the outer product of [1, 2, 1] / 4
    (size 3) or [1, 4, 6, 4, 1] / 16 (size 5), rounded; size 1 is the identity."""
    img = np.zeros((9, 9, 3), np.uint8)
    img[4, 4] = 255
    for k, row in ((3, [1, 2, 1]), (5, [1, 4, 6, 4, 1])):
        r = np.array(row, float) / sum(row)
        expected = np.zeros((9, 9))
        h = k // 2
        expected[4 - h:5 + h, 4 - h:5 + h] = 255 * np.outer(r, r)
        got = A.blur(img, k).astype(int)
        assert np.abs(got - np.rint(expected)[..., None]).max() <= 1, k
    assert A.blur(img, 1) is img


def test_resize_is_opencv_linear_for_images_and_nearest_for_masks():
    """A source larger than the canvas: bilinear on half-pixel centres WITHOUT
    antialiasing (cv2.INTER_LINEAR, as A.Resize), and the mask's nearest neighbour is
    source index floor(i * scale) (cv2.INTER_NEAREST)."""
    rgb, mask = photo()                                      # 500 x 333
    size = 128
    img, m = A.square(rgb, mask, size)
    h, w = mask.shape
    rows = np.floor(np.arange(size) * h / size).astype(int)
    cols = np.floor(np.arange(size) * w / size).astype(int)
    assert np.array_equal(m, mask[rows][:, cols])

    def axis(n_src):
        x = np.clip((np.arange(size) + 0.5) * n_src / size - 0.5, 0, n_src - 1)
        lo = np.floor(x).astype(int)
        return lo, np.minimum(lo + 1, n_src - 1), x - lo
    (y0, y1, fy), (x0, x1, fx) = axis(h), axis(w)
    src = rgb.astype(float)
    top = src[y0][:, x0] * (1 - fx)[None, :, None] + src[y0][:, x1] * fx[None, :, None]
    bottom = src[y1][:, x0] * (1 - fx)[None, :, None] + src[y1][:, x1] * fx[None, :, None]
    expected = top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]
    assert np.abs(img.astype(float) - expected).max() <= 1.0   # OpenCV's fixed-point rounding
    same, same_m = A.square(img, m, size)
    assert same is img and same_m is m                        # already the canvas size: untouched


def test_rotation_turns_about_the_pixel_centre_counter_clockwise():
    mask = np.arange(16, dtype=np.uint8).reshape(4, 4)
    img = np.repeat(mask[..., None] * 10, 3, axis=2).astype(np.uint8)
    r_img, r_mask = A.rotate(img, mask, 90.0)
    assert np.array_equal(r_mask, np.rot90(mask))              # exact on the grid
    assert np.array_equal(r_img[..., 0], np.rot90(img[..., 0]))
    _, filled = A.rotate(img, np.full((8, 8), 3, np.uint8), 45.0)
    assert filled[0, 0] == 0 and filled[4, 4] == 3             # corners filled with background


def test_augment_is_deterministic_and_keeps_the_mask_in_its_classes():
    rgb, mask = photo()
    a = [A.augment(rgb, mask, 128, A.Augmentation(), np.random.default_rng(7)) for _ in range(2)]
    assert np.array_equal(a[0][0], a[1][0]) and np.array_equal(a[0][1], a[1][1])
    img, m = a[0]
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8 and m.shape == (128, 128)
    assert set(np.unique(m)) <= {0, 1, 2}


def test_crop_keeps_more_than_30_percent_of_the_focus_class():
    _, mask = A.square(*photo(), 128)
    rng = np.random.default_rng(0)
    for focus in (0, 1):
        total = (mask == focus).sum()
        for _ in range(20):
            y0, x0, side = A.crop_box(mask, 0.6, focus, rng)
            assert int(0.6 * 128) <= side <= 128
            assert (mask[y0:y0 + side, x0:x0 + side] == focus).sum() / total > 0.3


def test_crop_falls_back_to_the_whole_image_when_no_crop_qualifies():
    mask = np.zeros((64, 64), np.uint8)
    mask[0, 0] = mask[0, 63] = mask[63, 0] = mask[63, 63] = 1  # a crop smaller than 64 holds one corner: 25 %
    assert A.crop_box(mask, 0.6, 1, np.random.default_rng(0)) == (0, 0, 64)


@pytest.mark.parametrize("shots, classes, expected", [
    (1, 6, [0]),                                   # 1-shot: always background
    (10, 6, [0] * 8 + [1] * 2),                    # 10-shot: worker k's second sample -> class 1
    (20, 3, [0] * 8 + [1] * 8 + [2] * 4),
    (20, 2, [0] * 8 + [1] * 8 + [0] * 4),          # the counter wraps at K
])
def test_crop_focus_follows_the_official_loader_workers(shots, classes, expected):
    """8 workers, batches dealt in turn, each with its own counter from 0 every epoch."""
    assert [A.crop_focus(j, classes) for j in range(shots)] == expected
