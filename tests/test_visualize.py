"""Pictures of masks: exact colours on hand-built arrays, strips of real VOC photos and
ground truth, and the pages of a real (tiny-model) run."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from text2mask.classes import load_class_set
from text2mask.evaluation.semantic import evaluate_dirs
from text2mask.io import read_image, read_index_png
from text2mask.errors import InputError
from text2mask.wsss.visualize import strip, uncertainty_map, visualize_run
from text2mask.visualize import (
    BAR_ROW,
    CAPTION_HEIGHT,
    CHART_TOP,
    CHART_WIDTH,
    PAD,
    PALETTE,
    colorize,
    iou_bar_chart,
    legend,
    overlay,
    overlay_with_legend,
)

VOC = Path(__file__).resolve().parent.parent / "samples" / "voc-mini" / "VOC2012"
VOC_CLASSES = load_class_set("voc").names


def photo_and_gt(key):
    return read_image(VOC / "JPEGImages" / f"{key}.jpg"), read_index_png(VOC / "SegmentationClass" / f"{key}.png")


def colours(a: np.ndarray) -> int:
    return len(np.unique(a.reshape(-1, 3), axis=0))


# --- hand-built arrays --------------------------------------------------------------

def test_palette_is_the_pascal_voc_palette():
    assert PALETTE.shape == (256, 3) and PALETTE.dtype == np.uint8
    assert PALETTE[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert PALETTE[15].tolist() == [192, 128, 128]   # person
    assert PALETTE[255].tolist() == [224, 224, 192]  # VOC's void colour
    assert colours(PALETTE) == 256                   # COCO's 81 classes and 255 all distinct


def test_colorize_exact_colours():
    labels = np.array([[0, 1], [15, 255]], np.uint8)
    np.testing.assert_array_equal(colorize(labels), [[[0, 0, 0], [128, 0, 0]], [[192, 128, 128], [224, 224, 192]]])
    assert colorize(labels).dtype == np.uint8


def test_overlay_blends_classes_and_keeps_background():
    rgb = np.array([[[100, 100, 100], [100, 100, 100], [10, 20, 30]]], np.uint8)
    labels = np.array([[0, 1, 255]], np.uint8)
    out = overlay(rgb, labels, alpha=0.5)
    np.testing.assert_array_equal(out, [[[100, 100, 100], [114, 50, 50], [117, 122, 111]]])
    np.testing.assert_array_equal(overlay(rgb, labels, alpha=1.0)[0, 1], [128, 0, 0])


def test_uncertainty_map_white_where_top_two_scores_are_close():
    scores = np.array([
        [[0.50, 0.10], [0.90, 0.0]],   # background
        [[0.48, 0.80], [0.00, 0.3]],   # class a
        [[0.10, 0.20], [0.86, 0.3]],   # class b
    ], np.float32)
    expected = np.array([[255, 0], [255, 255]], np.uint8)  # gaps 0.02, 0.6, 0.04, 0.0
    out = uncertainty_map(scores)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, axis=2))
    assert not uncertainty_map(np.ones((1, 2, 3), np.float32)).any()  # background only


def test_legend_wraps_into_rows():
    one_row = legend([0, 1, 15], VOC_CLASSES)
    assert one_row.height == legend([0], VOC_CLASSES).height
    wrapped = legend([0, 1, 15], VOC_CLASSES, width=one_row.width // 2)
    assert wrapped.width == one_row.width // 2 and wrapped.height > one_row.height
    swatch = np.asarray(one_row)[PAD + 6, PAD + 6]  # inside the first swatch
    np.testing.assert_array_equal(swatch, PALETTE[0])


# --- strips of real photos and ground truth -----------------------------------------

def test_strip_columns_sizes_and_colours():
    rgb, gt = photo_and_gt("2007_000032")  # aeroplane + person, with 255 borders
    h, w = gt.shape
    initial = np.where(gt == 255, 0, gt).astype(np.uint8)
    uncertain = gt == 255
    present = np.unique(np.concatenate([np.unique(initial), np.unique(gt)])).tolist()

    img = strip(rgb, initial, gt, gt, uncertain, VOC_CLASSES)
    assert img.mode == "RGB"
    assert img.size == (5 * w, h + CAPTION_HEIGHT + legend(present, VOC_CLASSES, width=5 * w).height)
    a = np.asarray(img)
    np.testing.assert_array_equal(a[:h, :w], rgb)
    assert colours(a[:h, w:2 * w]) == len(np.unique(initial))           # no 255 in initial
    assert colours(a[:h, 2 * w:3 * w]) == len(np.unique(gt))            # classes + the 255 colour
    assert 255 in np.unique(gt) and colours(a[:h, 3 * w:4 * w]) == len(np.unique(gt))
    np.testing.assert_array_equal(a[:h, 4 * w:][uncertain], np.full((uncertain.sum(), 3), 255))
    assert not a[:h, 4 * w:][~uncertain].any()

    no_gt = strip(Image.fromarray(rgb), initial, gt, None, uncertain, VOC_CLASSES)
    assert no_gt.size == (4 * w, h + CAPTION_HEIGHT + legend(present, VOC_CLASSES, width=4 * w).height)


def test_strip_rejects_labels_of_another_size():
    rgb, gt = photo_and_gt("2007_000032")
    with pytest.raises(ValueError, match="initial is"):
        strip(rgb, gt[:-1], None, None, None, VOC_CLASSES)


def test_overlay_with_legend_keeps_the_photo_size():
    rgb, gt = photo_and_gt("2007_000039")
    img = overlay_with_legend(rgb, gt, VOC_CLASSES)
    assert img.mode == "RGB" and img.size == (rgb.shape[1], rgb.shape[0])


def test_iou_bar_chart_size_and_title_classes(tmp_path):
    res = evaluate_dirs(VOC / "SegmentationClass", VOC / "SegmentationClass",
                        ids=["2007_000032", "2007_000039"], class_names=VOC_CLASSES)
    present = [c for c in res["per_class"] if c["IoU"] is not None]
    assert 0 < len(present) < 21  # absent classes exist and must be left out
    path = iou_bar_chart(res, tmp_path / "chart.png")
    with Image.open(path) as im:
        assert im.mode == "RGB"
        assert im.size == (CHART_WIDTH, CHART_TOP + BAR_ROW * len(present) + PAD)


# --- a real run with the tiny model -------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    from text2mask.data.voc import load_voc
    from text2mask.wsss.predictor import MaskConfig, Text2Mask
    from text2mask.wsss.run import RunOptions, generate

    out = tmp_path_factory.mktemp("vis") / "run"
    predictor = Text2Mask.from_pretrained(str(tiny_model_dir), "voc", MaskConfig())
    summary = generate(predictor, load_voc(VOC, "train"), RunOptions(out=out, workers=0, limit=3, progress=False),
                       log=lambda _: None)
    assert summary.done == 3 and summary.failed == 0
    return out


def test_visualize_run_writes_strips_and_index(run_dir, tmp_path):
    pages = visualize_run(run_dir, n=2, out=tmp_path / "vis", images=VOC / "JPEGImages")
    index = pages.index
    assert index == tmp_path / "vis" / "index.html"
    assert len(pages.shown) == 2 and pages.skipped == {}
    ids = sorted(p.stem for p in (run_dir / "masks").glob("*.png"))[:2]
    assert sorted(p.stem for p in index.parent.glob("*.png")) == ids
    page = index.read_text()
    assert re.findall(r'src="([^"]+)"', page) == [f"{k}.png" for k in ids]
    for k in ids:
        rgb, gt = photo_and_gt(k)
        h, w = gt.shape
        initial, crf = read_index_png(run_dir / "initial" / f"{k}.png"), read_index_png(run_dir / "crf" / f"{k}.png")
        present = np.unique(np.concatenate([initial.ravel(), crf.ravel(), gt.ravel()])).tolist()
        with Image.open(index.parent / f"{k}.png") as im:
            im.load()
            assert im.mode == "RGB"
            assert im.size == (5 * w, h + CAPTION_HEIGHT + legend(present, VOC_CLASSES, width=5 * w).height)
            unsure = np.asarray(im)[:h, 4 * w:]
        expected = read_index_png(run_dir / "masks" / f"{k}.png") == 255
        np.testing.assert_array_equal(unsure.all(axis=2), expected)


def test_visualize_run_uses_the_recorded_image_folder(run_dir, tmp_path):
    doc = json.loads((run_dir / "run.json").read_text())
    assert doc["dataset"]["image_dir"] == str(VOC / "JPEGImages")
    index = visualize_run(run_dir, n=16).index
    assert index == run_dir / "vis" / "index.html"
    assert len(list(index.parent.glob("*.png"))) == 3

    doc["dataset"]["image_dir"] = None  # the runner's value when the photos lie in several folders
    (run_dir / "run.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match="--images"):
        visualize_run(run_dir, out=tmp_path / "none")
