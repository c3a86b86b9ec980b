"""Stage 3: SelfCross propagation, box masks, background and labels (ALGORITHM.md sections 3-5).

References are computed independently: dense float64 matrix products, OpenCV contours
(as CLIP-ES's scoremap2bbox does), and a numpy bilinear resize.
"""
import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage

from text2mask.wsss.propagate import (background, box_mask, class_cross, min_max, propagate,
                                 scores_with_background, self_cross)


def row_stochastic(rng, n):
    a = rng.random((n, n)) ** 4  # peaky rows, like softmax attention
    return a / a.sum(axis=1, keepdims=True)


def cv2_box_mask(norm_map, threshold):
    """CLIP-ES scoremap2bbox with every contour, as the reference uses it."""
    h, w = norm_map.shape
    u8 = (norm_map * 255).astype(np.uint8)
    _, binary = cv2.threshold(u8, int(threshold * np.max(u8)), 255, cv2.THRESH_BINARY)
    contours, _ = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    mask = np.zeros((h, w), bool)
    for c in contours:
        x, y, bw, bh = cv2.boundingRect(c)
        mask[y: min(y + bh, h - 1), x: min(x + bw, w - 1)] = True
    return mask


def np_min_max(x):
    lo, hi = x.min(), x.max()
    return np.zeros_like(x) if hi == lo else (x - lo) / (hi - lo)


def np_bilinear(a, size):
    """align_corners=False bilinear without antialiasing (float64)."""
    def weights(n_out, n_in):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0

    y0, y1, wy = weights(size[0], a.shape[-2])
    x0, x1, wx = weights(size[1], a.shape[-1])
    rows = a[..., y0, :] * (1 - wy)[:, None] + a[..., y1, :] * wy[:, None]
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx


# -- SelfCross = (Self^2 with masked columns) . cross ------------------------------------------

@pytest.mark.parametrize("h, w, k", [(5, 6, 3), (9, 12, 4), (1, 7, 1)])
def test_self_cross_equals_dense_reference(h, w, k):
    rng = np.random.default_rng(h * w + k)
    s = row_stochastic(rng, h * w)
    c = rng.random((k, h, w))
    m = rng.random((k, h, w)) > 0.4
    out = self_cross(torch.from_numpy(s).float(), torch.from_numpy(c).float(), torch.from_numpy(m).float())
    assert tuple(out.shape) == (k, h, w)
    s2 = s @ s
    for i in range(k):
        # (S^2 with the columns outside M zeroed) @ cross
        expected = (s2 * m[i].reshape(1, -1)) @ c[i].reshape(-1)
        np.testing.assert_allclose(out[i].numpy().reshape(-1), expected, rtol=0, atol=1e-5)
    # The mask matters: with all columns kept the result differs.
    full = self_cross(torch.from_numpy(s).float(), torch.from_numpy(c).float(), torch.ones(k, h, w))
    np.testing.assert_allclose(full.numpy().reshape(k, -1), (s2 @ c.reshape(k, -1).T).T, atol=1e-5)


def test_propagate_matches_reference_pipeline():
    rng = np.random.default_rng(7)
    h, w = 12, 16
    s = row_stochastic(rng, h * w)
    cross = ndimage.gaussian_filter(rng.random((3, h, w)), sigma=(0, 2, 2)).astype(np.float32)
    for thr in (0.2, 0.5):
        out = propagate(torch.from_numpy(s).float(), torch.from_numpy(cross), thr).numpy()
        s2 = s @ s
        for k in range(3):
            cn = np_min_max(cross[k].astype(np.float64))
            m = cv2_box_mask(cn.astype(np.float32), thr)
            assert 0 < m.sum() < h * w
            expected = np_min_max(((s2 * m.reshape(1, -1)) @ cn.reshape(-1)).reshape(h, w))
            # The final min-max stretches a narrow range: float32 rounding grows to ~2e-5.
            np.testing.assert_allclose(out[k], expected, atol=1e-4)
    # box_threshold=None skips the mask.
    out = propagate(torch.from_numpy(s).float(), torch.from_numpy(cross), None).numpy()
    cn = np_min_max(cross[0].astype(np.float64))
    np.testing.assert_allclose(out[0], np_min_max((s @ s @ cn.reshape(-1)).reshape(h, w)), atol=1e-4)


# -- box mask ------------------------------------------------------------------------------

def random_maps():
    rng = np.random.default_rng(0)
    maps = []
    for i in range(60):
        h, w = rng.integers(4, 40, size=2)
        noise = rng.random((h, w))
        if i % 3:
            noise = ndimage.gaussian_filter(noise, sigma=rng.uniform(0.5, 3))
        m = np_min_max(noise)
        if i % 5 == 0:
            m = m * rng.uniform(0.3, 1.0)  # maximum below 1: threshold of the uint8 maximum
        maps.append(m.astype(np.float32))
    return maps


@pytest.mark.parametrize("threshold", [0.2, 0.5])
def test_box_mask_equals_opencv(threshold):
    for m in random_maps():
        np.testing.assert_array_equal(box_mask(m, threshold), cv2_box_mask(m, threshold))


def check_both(m, threshold, expected):
    np.testing.assert_array_equal(cv2_box_mask(m, threshold), expected)  # the hand-built case is right
    np.testing.assert_array_equal(box_mask(m, threshold), expected)


def test_box_mask_strictly_greater_and_truncation():
    m = np.zeros((10, 12), np.float32)
    m[1:3, 1:3] = 1.0                   # uint8 255 -> threshold int(0.2 * 255) = 51
    m[6, 6] = np.float32(51.5 / 255)    # uint8 51: exactly the threshold, excluded
    m[6, 9] = np.float32(52.5 / 255)    # uint8 52: included
    expected = np.zeros((10, 12), bool)
    expected[1:3, 1:3] = True
    expected[6, 9] = True
    check_both(m, 0.2, expected)

    # uint8 scaling truncates: a maximum of 254.7 is 254 -> threshold int(0.5 * 254) = 127,
    # and 127.9 becomes 127 (rounding would give 255 -> 127 and 128 > 127).
    m = np.zeros((8, 8), np.float32)
    m[1, 1] = np.float32(254.7 / 255)
    m[5, 5] = np.float32(127.9 / 255)
    expected = np.zeros((8, 8), bool)
    expected[1, 1] = True
    check_both(m, 0.5, expected)


def test_box_mask_two_blobs_give_two_boxes():
    m = np.zeros((12, 12), np.float32)
    m[1:3, 1:3] = 1.0
    m[6:8, 7:10] = 0.8
    expected = np.zeros((12, 12), bool)
    expected[1:3, 1:3] = True
    expected[6:8, 7:10] = True
    check_both(m, 0.5, expected)
    assert not box_mask(m, 0.5)[4, 4]  # not the hull of both


def test_box_mask_diagonal_neighbours_are_one_region():
    m = np.zeros((8, 8), np.float32)
    m[2, 2] = m[3, 3] = 1.0
    expected = np.zeros((8, 8), bool)
    expected[2:4, 2:4] = True  # one 8-connected contour: its box covers (2, 3) and (3, 2)
    check_both(m, 0.2, expected)


def test_box_mask_ring_gives_outer_box():
    m = np.zeros((12, 12), np.float32)
    m[2:9, 3:10] = 1.0
    m[3:8, 4:9] = 0.0    # hole: an internal contour
    m[5, 6] = 1.0        # an island inside the hole
    expected = np.zeros((12, 12), bool)
    expected[2:9, 3:10] = True
    check_both(m, 0.5, expected)


def test_box_mask_clips_last_row_and_column():
    m = np.zeros((10, 10), np.float32)
    m[6:10, 7:10] = 1.0  # touches the right and bottom edges
    m[0:2, 0:3] = 1.0    # touches the left and top edges: kept
    expected = np.zeros((10, 10), bool)
    expected[6:9, 7:9] = True  # [x, min(x + w, W - 1)) x [y, min(y + h, H - 1))
    expected[0:2, 0:3] = True
    check_both(m, 0.2, expected)


def test_box_mask_of_zero_map_is_empty():
    assert not box_mask(np.zeros((5, 7), np.float32), 0.2).any()


# -- min-max and the no-contour case -------------------------------------------------------

def test_min_max():
    rng = np.random.default_rng(3)
    x = rng.random((3, 5, 6)) * 4 - 1
    x[1] = 2.5  # constant map
    out = min_max(torch.from_numpy(x).float()).numpy()
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0], np_min_max(x[0]), atol=1e-6)
    np.testing.assert_array_equal(out[1], np.zeros((5, 6)))
    np.testing.assert_allclose(out[2], np_min_max(x[2]), atol=1e-6)
    assert out[0].min() == 0 and out[0].max() == pytest.approx(1, abs=1e-6)


@pytest.mark.parametrize("threshold", [0.2, 0.5, None])
def test_constant_cross_map_gives_finite_zeros(threshold):
    rng = np.random.default_rng(4)
    s = torch.from_numpy(row_stochastic(rng, 20)).float()
    cross = torch.full((2, 4, 5), 0.3)
    cross[1] = torch.from_numpy(rng.random((4, 5))).float()
    out = propagate(s, cross, threshold)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all()
    assert out[1].max() == pytest.approx(1, abs=1e-6)


# -- background and labels -----------------------------------------------------------------

SC = torch.tensor([[[0.9, 0.2, 0.0], [0.4, 0.0, 1.0]],
                   [[0.1, 0.3, 0.0], [0.6, 0.7, 0.2]]])


def test_background_voc():
    bg = background(SC, tau=1.0, power=2)
    # max = [[0.9, 0.3, 0.0], [0.6, 0.7, 1.0]]
    np.testing.assert_allclose(bg.numpy(), [[0.01, 0.49, 1.0], [0.16, 0.09, 0.0]], atol=1e-6)
    labels = scores_with_background(SC, 1.0, 2).argmax(dim=0)
    np.testing.assert_array_equal(labels.numpy(), [[1, 0, 0], [2, 2, 1]])


def test_background_coco():
    bg = background(SC, tau=0.7, power=2)
    # (0.7 - max)^2; max = 1 gives 0.09, max = 0 gives 0.49, max = 0.7 gives 0
    np.testing.assert_allclose(bg.numpy(), [[0.04, 0.16, 0.49], [0.01, 0.0, 0.09]], atol=1e-6)
    scores = scores_with_background(SC, 0.7, 2)
    assert tuple(scores.shape) == (3, 2, 3)
    np.testing.assert_array_equal(scores[1:].numpy(), SC.numpy())
    np.testing.assert_array_equal(scores.argmax(dim=0).numpy(), [[1, 2, 0], [2, 2, 1]])


# -- class cross maps ----------------------------------------------------------------------

def test_class_cross_matches_independent_computation():
    rng = np.random.default_rng(5)
    grid = (12, 16)
    shapes = [(6, 8), (6, 8), (3, 4), (6, 8), (6, 8)]  # blocks 4, 5 (/4), 6 (/8), 7, 8 (/4)
    blocks = [rng.random((h, w, 77)) for h, w in shapes]
    blocks = [b / b.sum(-1, keepdims=True) for b in blocks]
    spans = [(4,), (6, 7, 8), (10, 11)]
    out = class_cross([torch.from_numpy(b).float() for b in blocks], spans, grid)
    assert tuple(out.shape) == (3, *grid)
    for k, span in enumerate(spans):
        per_block = [np_bilinear(b[..., list(span)].mean(-1), grid) for b in blocks]
        np.testing.assert_allclose(out[k].numpy(), np.mean(per_block, axis=0), atol=1e-5)
