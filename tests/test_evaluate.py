from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from text2mask.classes import load_class_set
from text2mask.evaluation.semantic import (
    SemanticMetric,
    confusion,
    evaluate_dirs,
    format_table,
    scores,
)
from text2mask.data.base import read_split_file
from text2mask.io import write_index_png
from text2mask.errors import InputError

VOC_GT = Path(__file__).parent.parent / "samples" / "voc-mini" / "VOC2012" / "SegmentationClass"
VOC_CLASSES = load_class_set("voc").names


def pct(x):
    """Fractions of the hand computations in percent, as the metrics are given."""
    return None if x is None else 100 * x


# --- hand-built arrays --------------------------------------------------------------

def test_confusion_and_scores_by_hand():
    gt = np.array([[0, 0, 1], [1, 2, 255]], dtype=np.uint8)
    pred = np.array([[0, 1, 1], [2, 2, 0]], dtype=np.uint8)
    conf = confusion(gt, pred, 3)
    # The GT-255 pixel (predicted 0) is not counted anywhere.
    expected = np.array([
        [1, 1, 0, 0],  # GT 0: one hit, one predicted as 1
        [0, 1, 1, 0],  # GT 1: one hit, one predicted as 2
        [0, 0, 1, 0],  # GT 2: one hit
    ])
    assert conf.dtype == np.int64
    np.testing.assert_array_equal(conf, expected)

    r = scores(conf, ["a", "b", "c"])
    # IoU0 = 1/(2+1-1), IoU1 = 1/(2+2-1), IoU2 = 1/(1+2-1)
    assert [c["IoU"] for c in r["per_class"]] == pytest.approx([50, 100 / 3, 50], abs=1e-12)
    # Acc_c = T_c / G_c: 1/2, 1/2, 1/1; mAcc their mean
    assert [c["Acc"] for c in r["per_class"]] == pytest.approx([50, 50, 100], abs=1e-12)
    assert r["mAcc"] == pytest.approx(200 / 3, abs=1e-12)
    assert r["confusion"] == expected.tolist()
    assert r["mIoU"] == pytest.approx(pct(4 / 9), abs=1e-12)
    assert r["aAcc"] == pytest.approx(pct(3 / 5), abs=1e-12)
    assert r["classes_in_mean"] == 3
    assert [c["gt_pixels"] for c in r["per_class"]] == [2, 2, 1]
    assert [c["pred_pixels"] for c in r["per_class"]] == [1, 2, 2]
    assert [c["name"] for c in r["per_class"]] == ["a", "b", "c"]
    assert "coverage" not in r and "mIoU_confident" not in r


def test_gt_255_is_ignored_whatever_is_predicted():
    gt = np.array([[0, 1, 255, 255]])
    base = confusion(gt, np.array([[0, 1, 0, 0]]), 2)
    for filler in (1, 255):
        np.testing.assert_array_equal(confusion(gt, np.array([[0, 1, filler, filler]]), 2), base)
    np.testing.assert_array_equal(base, [[1, 0, 0], [0, 1, 0]])


def test_class_absent_from_gt_left_out_of_mean_but_its_false_positives_count():
    gt = np.array([[0, 0], [1, 1]])
    pred = np.array([[0, 2], [1, 1]])
    conf = confusion(gt, pred, 3)
    np.testing.assert_array_equal(conf, [[1, 0, 1, 0], [0, 2, 0, 0], [0, 0, 0, 0]])
    r = scores(conf)
    # Class 0 loses a pixel to class 2: IoU0 = 1/(2+1-1); class 2 is not in the mean.
    assert r["per_class"][0]["IoU"] == pytest.approx(50, abs=1e-12)
    assert r["per_class"][1]["IoU"] == 100.0
    assert r["per_class"][2]["IoU"] is None and r["per_class"][2]["Acc"] is None
    assert r["per_class"][2]["pred_pixels"] == 1
    assert r["classes_in_mean"] == 2
    assert r["mIoU"] == pytest.approx(pct(3 / 4), abs=1e-12)


def test_prediction_255_miss_coverage_and_confident():
    gt = np.array([[0, 0, 0, 1], [1, 1, 1, 255]])
    pred = np.array([[0, 255, 1, 1], [255, 1, 0, 0]])
    conf = confusion(gt, pred, 2)
    np.testing.assert_array_equal(conf, [[1, 1, 1], [1, 2, 1]])
    r = scores(conf)
    # (a) 255 = miss: IoU0 = 1/(3+2-1), IoU1 = 2/(4+3-2)
    assert r["mIoU"] == pytest.approx(pct((1 / 4 + 2 / 5) / 2), abs=1e-12)
    assert r["aAcc"] == pytest.approx(pct(3 / 7), abs=1e-12)
    assert [c["gt_pixels"] for c in r["per_class"]] == [3, 4]
    # (b) 5 of 7 valid GT pixels have a confident prediction
    assert r["coverage"] == pytest.approx(pct(5 / 7), abs=1e-12)
    # (c) confident only: [[1,1],[1,2]] -> IoU0 = 1/(2+2-1), IoU1 = 2/(3+3-2)
    assert r["mIoU_confident"] == pytest.approx(pct((1 / 3 + 1 / 2) / 2), abs=1e-12)
    assert r["aAcc_confident"] == pytest.approx(pct(3 / 5), abs=1e-12)


def test_all_predictions_255():
    r = scores(confusion(np.array([[0, 1]]), np.array([[255, 255]]), 2))
    assert r["mIoU"] == 0.0 and r["coverage"] == 0.0 and r["mAcc"] == 0.0
    assert r["mIoU_confident"] is None and r["aAcc_confident"] is None


def test_invalid_values_rejected():
    with pytest.raises(ValueError, match=r"prediction has values \[3, 254\]"):
        confusion(np.zeros((1, 3), np.uint8), np.array([[3, 254, 255]], np.uint8), 3)
    with pytest.raises(ValueError, match=r"ground truth has values \[7\]"):
        confusion(np.array([[7]]), np.array([[0]]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion(np.zeros((2, 2)), np.zeros((2, 3)), 3)
    with pytest.raises(ValueError, match="no valid ground-truth pixels"):
        scores(confusion(np.full((2, 2), 255), np.zeros((2, 2)), 3))


def test_no_uint8_overflow_in_index():
    # 81 COCO classes: 80 * 82 + 80 overflows uint8 if not widened first.
    conf = confusion(np.array([[80]], np.uint8), np.array([[80]], np.uint8), 81)
    assert conf[80, 80] == 1 and conf.sum() == 1


# --- files -----------------------------------------------------------------------

def _write(folder: Path, id_: str, a) -> Path:
    path = folder / f"{id_}.png"
    write_index_png(path, np.asarray(a, dtype=np.uint8))
    return path


def test_shape_mismatch_names_both_files(tmp_path):
    pred_path = _write(tmp_path / "pred", "x", np.zeros((4, 6)))
    gt_path = _write(tmp_path / "gt", "x", np.zeros((4, 5)))
    with pytest.raises(InputError) as e:
        evaluate_dirs(tmp_path / "pred", tmp_path / "gt")
    msg = str(e.value)
    assert str(pred_path) in msg and str(gt_path) in msg
    assert "6x4" in msg and "5x4" in msg


def test_invalid_prediction_value_names_file(tmp_path):
    pred_path = _write(tmp_path / "pred", "x", [[0, 21]])
    _write(tmp_path / "gt", "x", [[0, 1]])
    with pytest.raises(InputError, match=r"\[21\]") as e:
        evaluate_dirs(tmp_path / "pred", tmp_path / "gt")
    assert str(pred_path) in str(e.value)


def test_missing_prediction_for_listed_id(tmp_path):
    _write(tmp_path / "pred", "a", [[0]])
    _write(tmp_path / "gt", "a", [[0]])
    _write(tmp_path / "gt", "b", [[0]])
    with pytest.raises(InputError, match="'b'"):
        evaluate_dirs(tmp_path / "pred", tmp_path / "gt", ids=["a", "b"])


def _voc_gt() -> dict[str, np.ndarray]:
    paths = sorted(VOC_GT.glob("*.png"))
    assert len(paths) == 19
    # np.asarray of a mode-'P' image gives the palette indices (not colours / luminance).
    return {p.stem: np.asarray(Image.open(p)) for p in paths}


def _expected_by_pixel_sets(gts: dict, preds: dict, num_classes: int = 21) -> dict:
    """Reference numbers via per-class pixel sets and exact fractions."""
    inter = [0] * num_classes
    union = [0] * num_classes
    in_gt = [0] * num_classes
    inter_c = [0] * num_classes
    in_gt_c = [0] * num_classes
    union_c = [0] * num_classes
    valid_total = confident_total = correct = 0
    for id_, gt in gts.items():
        pred = preds[id_]
        valid = gt != 255
        sure = valid & (pred != 255)
        valid_total += int(valid.sum())
        confident_total += int(sure.sum())
        correct += int((valid & (gt == pred)).sum())
        for c in range(num_classes):
            g, p = gt == c, pred == c
            inter[c] += int((g & p & valid).sum())
            union[c] += int(((g | p) & valid).sum())
            in_gt[c] += int((g & valid).sum())
            inter_c[c] += int((g & p & sure).sum())
            in_gt_c[c] += int((g & sure).sum())
            union_c[c] += int(((g | p) & sure).sum())
    present = [c for c in range(num_classes) if in_gt[c]]
    # Confident mean: classes with GT pixels left after dropping predicted-255 pixels.
    present_c = [c for c in range(num_classes) if in_gt_c[c]]
    return {
        "miou": float(sum(Fraction(inter[c], union[c]) for c in present) / len(present)),
        "pixel_accuracy": float(Fraction(correct, valid_total)),
        "ious": [float(Fraction(inter[c], union[c])) if in_gt[c] else None for c in range(num_classes)],
        "accs": [float(Fraction(inter[c], in_gt[c])) if in_gt[c] else None for c in range(num_classes)],
        "macc": float(sum(Fraction(inter[c], in_gt[c]) for c in present) / len(present)),
        "in_gt": in_gt,
        "classes_in_mean": len(present),
        "coverage": float(Fraction(confident_total, valid_total)),
        "miou_confident": float(
            sum(Fraction(inter_c[c], union_c[c]) for c in present_c) / len(present_c)
        ),
    }


def test_voc_gt_against_itself(tmp_path):
    gts = _voc_gt()
    preds = {}
    for id_, gt in gts.items():
        preds[id_] = np.where(gt == 255, 0, gt)  # void pixels become background predictions
        _write(tmp_path, id_, preds[id_])
    r = evaluate_dirs(tmp_path, VOC_GT, class_names=VOC_CLASSES)
    # GT void is ignored, so every counted pixel is right: all 21 classes occur, IoU 1.
    assert r["images"] == 19
    assert r["mIoU"] == 100.0 and r["aAcc"] == 100.0 and r["mAcc"] == 100.0
    assert r["classes_in_mean"] == 21
    assert all(c["IoU"] == 100.0 and c["Acc"] == 100.0 for c in r["per_class"])
    expected = _expected_by_pixel_sets(gts, preds)
    assert [c["gt_pixels"] for c in r["per_class"]] == expected["in_gt"]
    assert [c["pred_pixels"] for c in r["per_class"]] == expected["in_gt"]
    assert [c["name"] for c in r["per_class"]] == VOC_CLASSES
    assert "coverage" not in r


def test_voc_perturbed(tmp_path):
    gts = _voc_gt()
    preds = {}
    for id_, gt in gts.items():
        pred = gt.copy()
        pred[gt == 15] = 0  # person missed as background
        pred[gt == 9] = 255  # chair left unsure
        pred[:20, :30] = 18  # sofa false positives in every corner
        pred[gt == 255] = 7  # whatever is predicted on void must not count
        preds[id_] = pred
        _write(tmp_path, id_, pred)
    expected = _expected_by_pixel_sets(gts, preds)
    r = evaluate_dirs(tmp_path, VOC_GT, class_names=VOC_CLASSES)
    assert r["images"] == 19
    assert r["classes_in_mean"] == 21
    assert [c["IoU"] for c in r["per_class"]] == pytest.approx([pct(x) for x in expected["ious"]], abs=1e-12)
    assert [c["Acc"] for c in r["per_class"]] == pytest.approx([pct(x) for x in expected["accs"]], abs=1e-12)
    assert r["mAcc"] == pytest.approx(pct(expected["macc"]), abs=1e-12)
    assert r["per_class"][15]["IoU"] == 0.0
    assert r["per_class"][9]["IoU"] == 0.0
    assert r["mIoU"] == pytest.approx(pct(expected["miou"]), abs=1e-12)
    assert r["aAcc"] == pytest.approx(pct(expected["pixel_accuracy"]), abs=1e-12)
    assert r["coverage"] == pytest.approx(pct(expected["coverage"]), abs=1e-12)
    assert r["mIoU_confident"] == pytest.approx(pct(expected["miou_confident"]), abs=1e-12)
    assert 0 < r["coverage"] < 100 and r["mIoU"] < r["mIoU_confident"] < 100

    # A subset through ids: only classes in those images' GT enter the mean.
    ids = ["2007_000549", "2007_000033"]  # cat; aeroplane
    sub = evaluate_dirs(tmp_path, VOC_GT, ids=ids)
    exp_sub = _expected_by_pixel_sets({i: gts[i] for i in ids}, preds)
    assert sub["images"] == 2
    assert sub["classes_in_mean"] == 3
    assert sub["mIoU"] == pytest.approx(pct(exp_sub["miou"]), abs=1e-12)
    assert sub["per_class"][18]["IoU"] is None and sub["per_class"][18]["pred_pixels"] > 0
    assert "coverage" not in sub


# --- table and split files ----------------------------------------------------------

def test_format_table():
    r = scores(np.array([[1, 0, 1, 0], [0, 2, 0, 0], [0, 0, 0, 0]]), ["bg", "cat", "dog"])
    r["images"] = 2
    lines = format_table(r, "Hand").splitlines()
    assert lines[0] == "Hand"
    rows = [line.split() for line in lines[2:5]]
    assert rows == [["0", "bg", "50.0", "50.0"], ["1", "cat", "100.0", "100.0"], ["2", "dog", "-", "-"]]
    text = "\n".join(lines)
    assert "mIoU: 75.0% over 2 classes" in text
    assert "mAcc: 75.0%" in text
    assert "aAcc (pixel accuracy): 75.0%" in text
    assert "images: 2" in text
    assert "coverage" not in text

    r = scores(np.array([[1, 1, 1], [1, 2, 1]]))
    text = format_table(r, "Unsure")
    assert "mIoU: 32.5%" in text  # 13/40
    assert "coverage (prediction not 255): 71.4%" in text  # 5/7
    assert "mIoU on confident pixels: 41.7%" in text  # 5/12
    assert "aAcc on confident pixels: 60.0%" in text


def test_read_split_file(tmp_path):
    path = tmp_path / "split.txt"
    path.write_text(
        "2007_000032\n"
        "\n"
        "/JPEGImages/2007_000039.jpg /SegmentationClassAug/2007_000039.png\n"
        "  2007_000033  \n"
        "2007_000032\n"
        "/JPEGImages/2007_000033.jpg /SegmentationClassAug/2007_000033.png\n"
    )
    assert read_split_file(path) == ["2007_000032", "2007_000039", "2007_000033"]
    voc_split = VOC_GT.parent / "ImageSets" / "Segmentation" / "train.txt"
    assert read_split_file(voc_split) == sorted(p.stem for p in VOC_GT.glob("*.png"))
    with pytest.raises(InputError, match="not found"):
        read_split_file(tmp_path / "missing.txt")


def test_voc_classes():
    # Read from the bundled voc.json, the one place VOC's names live.
    assert len(VOC_CLASSES) == 21
    assert VOC_CLASSES[0] == "background" and VOC_CLASSES[15] == "person"
    assert VOC_CLASSES[-1] == "tvmonitor"


def test_a_16_bit_mask_value_past_255_is_an_error_not_a_wrapped_class(tmp_path):
    from text2mask.io import read_index_png

    path = tmp_path / "m16.png"
    Image.fromarray(np.array([[0, 15], [300, 255]], dtype=np.uint16)).save(path)
    with pytest.raises(InputError, match=r"m16\.png: mask values outside 0\.\.255 \(max 300\)"):
        read_index_png(path)
    Image.fromarray(np.array([[0, 15], [20, 255]], dtype=np.uint16)).save(path)
    np.testing.assert_array_equal(read_index_png(path), [[0, 15], [20, 255]])


# --- accumulate-then-compute, and mmseg's nanmean ---------------------------------------

def test_semantic_metric_accumulates_like_evaluate_dirs(tmp_path):
    gts = _voc_gt()
    ids = sorted(gts)[:5]
    metric = SemanticMetric(21, VOC_CLASSES)
    for i in ids:
        pred = np.where(gts[i] == 15, 0, gts[i])
        _write(tmp_path, i, pred)
        metric.process(gts[i], pred)
    got = metric.compute_metrics()
    assert got["images"] == 5
    direct = evaluate_dirs(tmp_path, VOC_GT, ids=ids, class_names=VOC_CLASSES)
    assert {k: v for k, v in direct.items() if k != "gt_without_prediction"} == got


def _mmseg_nanmean(conf: np.ndarray) -> tuple[float, float]:
    """mmseg's IoUMetric formulas, written out: histograms of intersect / pred / label over
    valid pixels (predicted 255 falls outside the histogram range), then nanmean."""
    n = conf.shape[0]
    inter = np.diag(conf[:, :n]).astype(float)
    label = conf.sum(axis=1).astype(float)
    pred = conf[:, :n].sum(axis=0).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / (pred + label - inter)
        acc = inter / label
    return 100 * np.nanmean(iou), 100 * np.nanmean(acc)


def test_present_class_rule_against_mmseg_nanmean():
    gt = np.array([[0, 0, 1, 1, 255]])
    # No class absent from the GT is predicted: the two rules agree (class 2 is 0/0 in both).
    same = scores(confusion(gt, np.array([[0, 1, 1, 255, 2]]), 3))
    miou, macc = _mmseg_nanmean(np.array(same["confusion"]))
    assert same["mIoU"] == pytest.approx(miou, abs=1e-12) and same["mAcc"] == pytest.approx(macc, abs=1e-12)
    # Class 2 (absent from the GT) predicted on a valid pixel: mmseg counts IoU_2 = 0, we leave it out.
    differ = scores(confusion(gt, np.array([[0, 2, 1, 1, 0]]), 3))
    miou, macc = _mmseg_nanmean(np.array(differ["confusion"]))
    assert differ["mIoU"] == pytest.approx(100 * (1 / 2 + 1) / 2, abs=1e-12)   # IoU0 = 1/2, IoU1 = 1
    assert miou == pytest.approx(100 * (1 / 2 + 1 + 0) / 3, abs=1e-12)
    assert differ["mAcc"] == pytest.approx(macc, abs=1e-12)                      # mAcc: always the same
