"""SLiMe inference stages against independent computations on synthetic maps."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from text2mask.slime import segment as S


def test_tile_coordinates_follow_the_official_integer_stride():
    assert S.tiles(512, 512, 1) == [S.Tile(0, 512, 0, 512)]
    boxes = S.tiles(512, 400, 2)     # stride 112
    assert [(b.y0, b.y1, b.x0, b.x1) for b in boxes] == [
        (0, 400, 0, 400), (0, 400, 112, 512), (112, 512, 0, 400), (112, 512, 112, 512)]
    b3 = S.tiles(512, 300, 3)        # stride 106: the last tile stops at 512
    assert [b.x0 for b in b3[:3]] == [0, 106, 212] and b3[-1].x1 == 512
    with pytest.raises(ValueError):
        S.tiles(512, 600, 2)


def test_affine_onto_and_its_constant_guards():
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    np.testing.assert_allclose(S.affine_onto(x, 0.1, 0.5).numpy(), [[0.1, 0.2], [0.3, 0.5]], rtol=1e-6)
    assert torch.equal(S.affine_onto(torch.full((2, 2), 0.3), 0.1, 0.5), torch.full((2, 2), 0.1))
    assert torch.equal(S.affine_onto(x, 0.2, 0.2), torch.full((2, 2), 0.2))


def bilinear(m, size):
    return F.interpolate(torch.from_numpy(m)[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def reference_merge(crosses, selfs, boxes, k, canvas, thr):
    """Straight transcription of the spec's steps 3-5 in float64 with numpy loops."""
    total = np.zeros((k, canvas, canvas))
    count = np.full((k, canvas, canvas), 1e-7)
    for cross, a, (y0, y1, x0, x1) in zip(crosses, selfs, boxes):
        h, w = cross.shape[1:]
        flat = cross.reshape(k, -1)
        mx, mn = flat.max(axis=1), flat.min(axis=1)
        kept = [c for c in range(k) if mx[c] >= thr]
        for n, c in enumerate(kept):
            v = flat[c].copy()
            if n == 0:
                v = np.where(v > v.mean(), v, 0.0)
            wmap = np.array([sum(a[q, j] * v[j] for j in range(h * w)) for q in range(h * w)]).reshape(h, w)
            big = bilinear(wmap, (y1 - y0, x1 - x0))
            span = big.max() - big.min()
            if span > 0 and mx[c] > mn[c]:
                big = mn[c] + (big - big.min()) * (mx[c] - mn[c]) / span
            else:
                big = np.full_like(big, mn[c])
            total[c, y0:y1, x0:x1] += big
            count[c, y0:y1, x0:x1] += 1
    return total / count


def test_tiling_and_merge_equal_an_independent_computation():
    k, canvas, g = 3, 24, torch.Generator().manual_seed(5)
    boxes = S.tiles(canvas, 16, 2)
    crosses, selfs = [], []
    for i in range(len(boxes)):
        c = torch.rand(k, 4, 4, generator=g, dtype=torch.float64) * 0.4
        if i == 1:
            c[2] *= 0.2              # class 2 below the threshold in this tile
        if i == 3:
            c[0] = 0.05              # background never kept here: class 1 gets the mean cut
        crosses.append(c)
        selfs.append(torch.rand(16, 16, generator=g, dtype=torch.float64).softmax(dim=1))
    parts = [S.tile_scores(c, a, b, 0.2) for c, a, b in zip(crosses, selfs, boxes)]
    assert parts[1].kept == [0, 1] and parts[3].kept == [1, 2]
    got = S.merge(parts, k, canvas).double().numpy()
    expected = reference_merge([c.numpy() for c in crosses], [a.numpy() for a in selfs],
                               [(b.y0, b.y1, b.x0, b.x1) for b in boxes], k, canvas, 0.2)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_nothing_kept_gives_background_and_threshold_zero_keeps_all():
    cross = torch.full((3, 2, 2), 0.01)
    tile = S.Tile(0, 8, 0, 8)
    none = S.tile_scores(cross, torch.eye(4), tile, 0.2)
    assert none.kept == []
    labels = S.labels_at(S.merge([none], 3, 8), (8, 8), (5, 7))
    assert labels.shape == (5, 7) and int(labels.max()) == 0
    assert S.tile_scores(cross, torch.eye(4), tile, 0.0).kept == [0, 1, 2]


def test_labels_at_cuts_padding_then_resizes_scores_before_the_argmax():
    scores = torch.zeros(2, 4, 4)
    scores[1, :2, :2] = 1.0          # class 1 in the top-left of the valid 2x4 band
    scores[1, 2:, :] = 5.0           # padding rows: must not leak in
    labels = S.labels_at(scores, (2, 4), (4, 8))
    expected = F.interpolate(scores[None, :, :2, :4], size=(4, 8), mode="bilinear",
                             align_corners=False)[0].argmax(dim=0)
    assert torch.equal(labels, expected.to(torch.uint8))
    assert labels.dtype == torch.uint8 and labels[:, :3].eq(1).all() and labels[:, 5:].eq(0).all()


def test_was_panel_and_strip():
    from text2mask.slime.pictures import was_panel, was_strip

    score = np.zeros((8, 8), np.float32)
    score[:4, :4] = 2.0
    score[6:, :] = 9.0                        # outside the valid 5 x 8 region: cut away
    panel = was_panel(score, (5, 8), (10, 16))
    assert panel.shape == (10, 16, 3) and panel[0, 0, 0] == 255 and panel[-1, -1, 0] == 0
    assert not was_panel(np.ones((8, 8), np.float32), (8, 8), (4, 4)).any()   # constant: black
    rgb = np.full((10, 16, 3), 128, np.uint8)
    labels = np.zeros((10, 16), np.uint8)
    labels[:5] = 1
    img = was_strip(rgb, np.stack([score, score]), (5, 8), labels, ["background", "part"])
    assert img.width == 4 * 16 and img.height > 10
    with pytest.raises(ValueError, match="labels are"):
        was_strip(rgb, np.stack([score, score]), (5, 8), labels[:5], ["background", "part"])
