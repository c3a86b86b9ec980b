"""SLiMe's training augmentation on a real photo and its part mask (samples/slime-mini)."""
from pathlib import Path

import cv2
import numpy as np

from text2mask.io import read_image, read_index_png
from text2mask.slime import augment as A

SAMPLES = Path(__file__).resolve().parent.parent / "samples/slime-mini"


def photo():
    return read_image(SAMPLES / "car.jpg"), read_index_png(SAMPLES / "car.png")


def test_blur_equals_opencv_gaussian_blur_with_sigma_zero():
    rgb, _ = photo()
    for k in (3, 5):
        # OpenCV blurs uint8 in fixed point: equal up to one grey level
        diff = np.abs(A.blur(rgb, k).astype(int) - cv2.GaussianBlur(rgb, (k, k), 0).astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.05
    assert A.blur(rgb, 1) is rgb


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
