"""Part scores: the official per-image protocol and the confusion form, by hand."""
import numpy as np
import pytest

from text2mask.errors import InputError
from text2mask.evaluation import parts
from text2mask.io import write_index_png

GT1 = np.array([[0, 0, 1, 1], [0, 0, 1, 1]], np.uint8)
PR1 = np.array([[0, 1, 1, 1], [0, 0, 1, 2]], np.uint8)
GT2 = np.array([[0, 0, 0, 0], [2, 2, 255, 0]], np.uint8)
PR2 = np.array([[0, 1, 0, 0], [2, 0, 2, 2]], np.uint8)


def test_official_protocol_by_hand():
    m = parts.PartsMetric(["background", "a", "b"])
    # image 1: bg I=3 U=4; a I=3 U=5; b absent from GT -> not scored (its false positive is free)
    assert m.process(GT1, PR1) == pytest.approx({0: 3 / 4, 1: 3 / 5})
    # image 2 (void ignored): bg G={0,1,2,3,7} P={0,2,3,5} I=3 U=6; b G={4,5} P={4,7} I=1 U=3
    assert m.process(GT2, PR2) == pytest.approx({0: 3 / 6, 2: 1 / 3})
    r = m.compute_metrics()
    off = r["official"]
    assert [c["IoU"] for c in off["per_class"]] == pytest.approx([100 * (3 / 4 + 3 / 6) / 2, 60, 100 / 3])
    assert [c["images"] for c in off["per_class"]] == [2, 1, 1]
    assert off["mIoU"] == pytest.approx(100 * ((3 / 4 + 3 / 6) / 2 + 3 / 5 + 1 / 3) / 3)
    # confusion form over all 15 valid pixels: bg tp 6, gt 9, pred 7 -> 6/10;
    # a tp 3, gt 4, pred 5 -> 3/6; b tp 1, gt 2, pred 3 -> 1/4
    assert r["confusion"]["mIoU"] == pytest.approx(100 * (6 / 10 + 3 / 6 + 1 / 4) / 3)
    assert r["images"] == 2


def test_class_lists_of_the_benchmarks():
    assert parts.PART_CLASSES["car"][0] == "background" and len(parts.PART_CLASSES["car"]) == 6
    assert len(parts.PART_CLASSES["horse"]) == 5 and len(parts.PART_CLASSES["celeba"]) == 10


def test_evaluate_dirs_reads_npy_and_png_ground_truth(tmp_path):
    (tmp_path / "pred").mkdir(), (tmp_path / "gt").mkdir()
    write_index_png(tmp_path / "pred/a.png", PR1)
    write_index_png(tmp_path / "pred/b.png", PR2)
    np.save(tmp_path / "gt/a.npy", GT1.astype(np.float32))   # the authors' masks are .npy
    write_index_png(tmp_path / "gt/b.png", GT2)
    r = parts.evaluate_dirs(tmp_path / "pred", tmp_path / "gt", ["background", "a", "b"])
    assert r["official"]["mIoU"] == pytest.approx(100 * ((3 / 4 + 3 / 6) / 2 + 3 / 5 + 1 / 3) / 3)
    table = parts.format_table(r, "test")
    assert "per-image" in table and "images: 2" in table
    # squashed to 512 x 512 by nearest neighbour: every pixel is repeated, IoUs unchanged
    r512 = parts.evaluate_dirs(tmp_path / "pred", tmp_path / "gt", ["background", "a", "b"], official_size=True)
    assert r512["official"]["mIoU"] == pytest.approx(r["official"]["mIoU"])


def test_evaluate_dirs_names_bad_files(tmp_path):
    (tmp_path / "pred").mkdir(), (tmp_path / "gt").mkdir()
    write_index_png(tmp_path / "pred/a.png", PR1)
    with pytest.raises(InputError, match="no ground truth a.npy or a.png"):
        parts.evaluate_dirs(tmp_path / "pred", tmp_path / "gt", ["background", "a", "b"])
    np.save(tmp_path / "gt/a.npy", GT1 + 0.5)
    with pytest.raises(InputError, match="integers"):
        parts.evaluate_dirs(tmp_path / "pred", tmp_path / "gt", ["background", "a", "b"])
    np.save(tmp_path / "gt/a.npy", GT1 * 5)
    with pytest.raises(InputError, match=r"values \[5\]"):
        parts.evaluate_dirs(tmp_path / "pred", tmp_path / "gt", ["background", "a", "b"])
