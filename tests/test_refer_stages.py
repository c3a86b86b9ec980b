"""Pure stages of personalized referring segmentation: normalized cuts, assignment, scores."""
import itertools

import numpy as np
import pytest

from text2mask.evaluation.referring import NO_SEGMENT, ReferringMetric, gt_segments, iou
from text2mask.personal.assign import assign_all, best_first, correlation
from text2mask.personal.spectral import raster_order, segment, spectral_embedding


def _block_affinity(sizes, off=0.01, seed=0):
    """Row-normalized block-diagonal affinity (1 inside blocks, ``off`` across), with its
    cells permuted; returns (S, true block id per cell)."""
    n = sum(sizes)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    s = np.where(truth[:, None] == truth[None, :], 1.0, off)
    s /= s.sum(axis=1, keepdims=True)
    perm = np.random.default_rng(seed).permutation(n)
    return s[np.ix_(perm, perm)], truth[perm]


def test_spectral_recovers_permuted_blocks_exactly():
    s, truth = _block_affinity((5, 7, 9))
    area = np.ones((3, 7), dtype=bool)          # 21 cells = 5 + 7 + 9
    seg = segment(s, area, 3, seed=0)
    labels = seg.ravel()
    assert set(labels) == {1, 2, 3}
    # the partition is the blocks' partition: a bijection between labels and blocks
    pairs = set(zip(labels.tolist(), truth.tolist()))
    assert len(pairs) == 3
    assert sorted(np.bincount(labels)[1:].tolist()) == [5, 7, 9]
    # seeded runs are identical
    assert np.array_equal(seg, segment(s, area, 3, seed=0))


def test_spectral_embedding_is_the_generalized_eigenproblem():
    s, _ = _block_affinity((4, 6), off=0.05, seed=1)
    w = 0.5 * (s + s.T)
    v = spectral_embedding(w, 3)
    d = np.diag(w.sum(1))
    # (D - W) v = λ D v for each column, with λ = vᵀ(D−W)v / vᵀDv
    for col in v.T:
        lam = col @ (d - w) @ col / (col @ d @ col)
        np.testing.assert_allclose((d - w) @ col, lam * d @ col, atol=1e-10)


def test_segments_only_inside_area_and_raster_labels():
    s, truth = _block_affinity((6, 6), off=0.001, seed=2)
    area = np.zeros((4, 6), dtype=bool)
    area[:2] = True                       # 12 cells; the rest of the grid is ignored
    big = np.full((24, 24), 1e-3)
    big[:12, :12] = s
    big /= big.sum(1, keepdims=True)
    seg = segment(big, area, 2, seed=0)
    assert (seg[2:] == 0).all() and (seg[:2] > 0).all()
    # K = 1: F is one segment; |F| < K: the whole grid
    assert np.array_equal(segment(big, area, 1), area.astype(np.int64))
    tiny = np.zeros_like(area)
    tiny[0, 0] = True
    assert (segment(big, tiny, 2, seed=0) > 0).all()


def test_raster_order_by_centroid_cell():
    # cluster 0 on the bottom row, cluster 1 on the top row -> cluster 1 becomes segment 1
    cells = np.array([0, 1, 6, 7])           # width 3: (0,0) (0,1) (2,0) (2,1)
    labels = np.array([1, 1, 0, 0])
    assert raster_order(labels, cells, 3, 2).tolist() == [1, 1, 2, 2]


def test_bf_ties_take_the_lowest_segment():
    c = np.array([[0.2, 0.5, 0.5], [0.1, 0.1, 0.0]])
    assert best_first(c).tolist() == [1, 0]


@pytest.mark.parametrize("q,k", [(q, k) for q in range(1, 7) for k in range(1, 7)])
def test_hungarian_equals_brute_force(q, k):
    rng = np.random.default_rng(100 * q + k)
    c = rng.random((q, k))
    got = assign_all(c)
    n = min(q, k)
    best = -np.inf
    for rows in itertools.combinations(range(q), n):
        for cols in itertools.permutations(range(k), n):
            best = max(best, sum(c[r, s] for r, s in zip(rows, cols)))
    if q <= k:
        assert len(set(got.tolist())) == q
        np.testing.assert_allclose(sum(c[i, got[i]] for i in range(q)), best, rtol=0, atol=1e-12)
    else:
        # k rows carry a matching worth the optimum; every other row keeps its bf choice
        assert any(len({int(got[r]) for r in rows}) == k
                   and abs(sum(c[r, got[r]] for r in rows) - best) < 1e-12
                   and all(got[i] == c[i].argmax() for i in range(q) if i not in rows)
                   for rows in itertools.combinations(range(q), k))


def test_surplus_queries_fall_back_to_bf():
    c = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.6]])
    # Hungarian over 3x2 picks rows (0 -> 0) and (2 -> 1): 0.9 + 0.6; row 1 keeps bf = 0
    assert assign_all(c).tolist() == [0, 0, 1]


def test_correlation_is_the_segment_mean():
    maps = np.array([[[1.0, 0.0], [0.5, 0.25]]])
    seg = np.array([[1, 2], [1, 0]])
    c = correlation(maps, seg, 3)
    assert c[0, 0] == 0.75 and c[0, 1] == 0.0 and c[0, 2] == -np.inf
    assert assign_all(np.array([[0.1, 0.2, -np.inf], [0.3, 0.1, -np.inf]])).tolist() == [1, 0]


def test_gt_segments_by_centroid_hungarian():
    seg = np.zeros((10, 10), dtype=np.int64)
    seg[:, :5] = 1
    seg[:, 5:] = 2
    left = np.zeros((10, 10), bool)
    left[2:8, 0:3] = True
    right = np.zeros((10, 10), bool)
    right[2:8, 6:9] = True
    assert gt_segments([right, left], seg, 2).tolist() == [1, 0]
    # three items, two segments: the farthest item is left without a segment
    mid = np.zeros((10, 10), bool)
    mid[0, 4:6] = True
    out = gt_segments([left, right, mid], seg, 2)
    assert out.tolist() == [0, 1, NO_SEGMENT]


def test_metrics_hand_computed():
    m = ReferringMetric()
    m.add(["all", "semantic"], bf=0, af=1, gt=1, iou_af=0.5, iou_bf=0.0)
    m.add(["all"], bf=1, af=1, gt=1, iou_af=1.0, iou_bf=1.0)
    m.add(["all", "visual"], bf=0, af=0, gt=NO_SEGMENT, iou_af=0.0, iou_bf=0.0)
    r = m.compute()
    assert r["all"] == {"mIoU": 50.0, "bf_acc": 100 / 3, "af_acc": 200 / 3, "mIoU_bf": 100 / 3, "triplets": 3}
    assert r["semantic"] == {"mIoU": 50.0, "bf_acc": 0.0, "af_acc": 100.0, "mIoU_bf": 0.0, "triplets": 1}
    assert r["visual"]["af_acc"] == 0.0
    a = np.zeros((4, 4), bool)
    a[:2, :2] = True
    b = np.zeros((4, 4), bool)
    b[:2, :] = True
    assert iou(a, b) == 0.5


def test_segments_equal_to_gt_masks_give_miou_equal_af_acc():
    rng = np.random.default_rng(3)
    seg = np.zeros((12, 12), dtype=np.int64)
    seg[:6, :6], seg[:6, 6:], seg[6:, :] = 1, 2, 3
    gts = [seg == s for s in (1, 2, 3)]
    m = ReferringMetric()
    for trial in range(20):
        target = int(rng.integers(3))
        af, bf = int(rng.integers(3)), int(rng.integers(3))
        gt = int(gt_segments(gts, seg, 3)[target])
        assert gt == target
        m.add(["all"], bf=bf, af=af, gt=gt, iou_af=iou(seg == af + 1, gts[target]),
              iou_bf=iou(seg == bf + 1, gts[target]))
    r = m.compute()["all"]
    assert r["mIoU"] == pytest.approx(r["af_acc"]) and r["mIoU_bf"] == pytest.approx(r["bf_acc"])


def test_eigengap_counts_the_blocks():
    from text2mask.personal.spectral import eigengap, eigengap_segments

    # two disconnected pairs: W has degrees 1, I - W has eigenvalues 0, 0, 2, 2 -> the gap is after 2
    pairs = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=float)
    assert eigengap(pairs, 1, 3) == 2
    assert eigengap(pairs, 3, 3) == 3            # the range decides when it holds one K
    s, _ = _block_affinity((5, 7, 9), off=0.01)
    assert eigengap(0.5 * (s + s.T), 1) == 3
    assert eigengap_segments(s, np.ones((3, 7), dtype=bool), 2) == 3
    assert eigengap_segments(s, np.ones((3, 7), dtype=bool), 4) >= 4     # never fewer than k_min


def test_af_of_a_group_is_its_own_hungarian():
    from text2mask.personal.assign import assign_groups

    c = np.array([[0.5, 0.4], [0.9, 0.1]])       # both queries prefer segment 0 alone (bf)
    assert assign_groups(c, [0], [(0,)]).tolist() == [0]          # a group of one: af = bf
    assert assign_groups(c, [0, 1], [(0, 1), (0, 1)]).tolist() == [1, 0]
    assert assign_groups(c, [1], [(0, 1)]).tolist() == [0]


def test_af_groups_hold_every_item_of_the_photo():
    """Items A, B, C of one photo; t1 (A, semantic) and t2 (B, visual) use their own
    concepts; t3 queries A with B's concept and t4 C with B's (variant)."""
    from text2mask.data.personal import Triplet
    from text2mask.personal.run import af_group_rows

    t1 = Triplet("t1", "p", "A", "a mug", "A", ("semantic",))
    t2 = Triplet("t2", "p", "B", "a mug", "B", ("visual",))
    t3 = Triplet("t3", "p", "A", "a mug", "B")
    t4 = Triplet("t4", "p", "C", "a mug", "B")
    photo, items = [t1, t2, t3, t4], ["A", "B", "C"]
    queries, rows, groups = af_group_rows(photo, [t1], items, "photo")
    assert [t.id for t in queries] == ["t1", "t2", "t4"] and rows == (0,) and groups == ((0, 1, 2),)
    queries, rows, groups = af_group_rows(photo, [t1], items, "split")
    assert [t.id for t in queries] == ["t1"] and groups == ((0,),)
    queries, rows, groups = af_group_rows(photo, [t3, t4], items, "photo")
    assert [t.id for t in queries] == ["t1", "t2", "t3", "t4"] and rows == (2, 3)
    assert groups == ((1, 2, 3), (0, 1, 3))     # each scored triplet with one triplet of each other item
