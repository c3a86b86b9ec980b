"""FSS scores (HSNet): per-episode areas, class IoU pooled over episodes, mIoU over the
fold's classes (unsampled = 0), FB-IoU, 4-fold mean — on hand-counted cases."""
import numpy as np
import pytest

from text2mask.evaluation.fewshot import FewShotIoU, episode_areas, four_fold_mean


def test_episode_areas_with_ignore():
    gt = np.array([[1, 1, 0], [0, 0, 0]], bool)
    pred = np.array([[1, 0, 1], [0, 0, 1]], bool)
    ignore = np.array([[0, 0, 0], [0, 0, 1]], bool)      # the last pixel (pred 1, gt 0) is skipped
    a = episode_areas(pred, gt, ignore)
    # valid pixels: (1,1) (0,1) (1,0) (0,0) (0,0)  as (pred, gt)
    assert a.tolist() == [[2, 1], [4, 3]]
    assert episode_areas(pred, gt).tolist() == [[2, 1], [5, 4]]


def test_class_iou_pools_episodes_and_unsampled_class_counts_zero():
    acc = FewShotIoU(test_classes=(1, 2, 3))
    acc.add(1, [[5, 2], [10, 4]])
    acc.add(1, [[7, 0], [8, 6]])          # class 1: (2 + 0) / (4 + 6) = 0.2 (pooled, not 0.25 averaged)
    acc.add(2, [[1, 3], [3, 3]])          # class 2: 1.0; class 3 never sampled: 0
    r = acc.compute()
    assert [c["IoU"] for c in r["per_class"]] == pytest.approx([20.0, 100.0, 0.0])
    assert r["mIoU"] == pytest.approx(40.0)
    # FB-IoU pooled over all episodes: bg 13/21, fg 5/13
    assert r["FB-IoU"] == pytest.approx(100 * (13 / 21 + 5 / 13) / 2)
    assert r["episodes"] == 3 and [c["episodes"] for c in r["per_class"]] == [2, 1, 0]


def test_zero_union_counts_as_one_and_foreign_class_refused():
    acc = FewShotIoU(test_classes=(4,))
    acc.add(4, [[6, 0], [6, 0]])          # empty prediction on an empty ground truth
    r = acc.compute()
    assert r["mIoU"] == 0.0 and r["FB-IoU"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="not a test class"):
        acc.add(5, [[0, 0], [0, 0]])


def test_four_fold_mean():
    folds = {f: {"mIoU": 10.0 * (f + 1), "FB-IoU": 50.0 + f} for f in range(4)}
    assert four_fold_mean(folds) == pytest.approx({"mIoU": 25.0, "FB-IoU": 51.5})
    with pytest.raises(ValueError, match="folds 0, 1, 2, 3"):
        four_fold_mean({0: folds[0]})
