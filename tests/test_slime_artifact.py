"""Parts files and segmentation on the tiny random models (MEANINGLESS weights)."""
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from text2mask.errors import InputError, ModelLoadError
from text2mask.io import read_image, read_index_png
from text2mask.slime import FitSettings, SegmentSettings, Slime
from text2mask.slime import artifact as A
from text2mask.slime import official
from text2mask.slime.fit import Example

SAMPLES = Path(__file__).resolve().parent.parent / "samples/slime-mini"
CLASSES = ["background", "top", "bottom"]
SEG = SegmentSettings(canvas=128, tile_size=128)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def car():
    return Example("car", read_image(SAMPLES / "car.jpg"), read_index_png(SAMPLES / "car.png"))


@pytest.fixture(scope="module")
def fitted(sd, car):
    return Slime.fit(sd, [car], CLASSES, FitSettings(epochs=2, segment=SEG), progress=False)


def test_round_trip_gives_identical_masks(sd, fitted, tmp_path):
    path = fitted.save(tmp_path / "car.slime")
    loaded = Slime.load(path, sd)
    assert loaded.classes == CLASSES and loaded.settings == SEG
    assert torch.equal(loaded.parts.cond, fitted.parts.cond.float())
    meta = loaded.parts.metadata()
    assert meta["learned_rows"] == [1, 2] and meta["model"]["family"] == "sd1"
    assert meta["model"]["hidden_size"] == fitted.parts.cond.shape[1] and meta["settings"]["lr"] == 0.1
    a, b = fitted(SAMPLES / "bus.jpg"), loaded(SAMPLES / "bus.jpg")
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.scores, b.scores)


def test_a_mismatched_base_model_is_refused(sd, sd2, fitted, tmp_path):
    with pytest.raises(ModelLoadError, match=f"text width {sd2.text_encoder.config.hidden_size}"):
        Slime(sd2, fitted.parts)                                  # another text width D
    other_family = replace(fitted.parts, model={**fitted.parts.model, "family": "sd2"})
    with pytest.raises(ModelLoadError, match="fitted on a sd2 model"):
        Slime(sd, other_family)


def test_another_digest_only_warns(sd, fitted):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("text2mask.slime.artifact")
    logger.addHandler(handler)
    try:
        other = replace(fitted.parts, model={**fitted.parts.model, "folder_sha256": "0" * 64})
        Slime(sd, other)
    finally:
        logger.removeHandler(handler)
    assert any("folder_sha256" in r.getMessage() for r in records)


def test_not_a_parts_file(tmp_path):
    bad = tmp_path / "x.slime"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="not a SLiMe parts file"):
        A.load_parts(bad)
    with pytest.raises(InputError, match="not found"):
        A.load_parts(tmp_path / "missing.slime")


def test_import_official_embedding_folder(sd, fitted, tmp_path):
    folder = tmp_path / "official"
    folder.mkdir()
    for i in range(2):   # as the official code saves them: (1, 1, D) leaf tensors
        torch.save(fitted.parts.cond[i + 1][None, None].clone().requires_grad_(True), folder / f"embedding_{i}.pth")
    parts = official.import_official(folder, sd, "background,top,bottom")
    assert torch.equal(parts.cond, fitted.parts.cond.float()) and parts.classes == CLASSES
    default_names = official.import_official(folder, sd)
    assert default_names.classes == ["background", "part1", "part2"]
    with pytest.raises(InputError, match="names 2"):
        official.import_official(folder, sd, "background,top")
    (folder / "embedding_0.pth").unlink()
    with pytest.raises(InputError, match="embedding_0.pth is missing"):
        official.import_official(folder, sd)


def test_segment_writes_original_size_labels_in_range(fitted):
    rgb = read_image(SAMPLES / "car.jpg")
    res = fitted(rgb, key="car")
    assert res.labels.shape == rgb.shape[:2] and res.labels.dtype == np.uint8
    assert set(np.unique(res.labels)) <= {0, 1, 2} and res.scores.shape == (3, 128, 128)
    # threshold 0 keeps every class: every score map is filled (values >= its m_k > 0)
    kept = fitted.with_settings(class_threshold=0.0)(rgb, key="car")
    assert (kept.scores > 0).all() and set(np.unique(kept.labels)) <= {0, 1, 2}
    # a threshold above 1 keeps nothing: all background
    none = fitted.with_settings(class_threshold=1.01)(rgb, key="car")
    assert not none.labels.any() and not none.scores.any()


def test_keep_aspect_tiles_and_batching(fitted):
    rgb = read_image(SAMPLES / "car.jpg")           # 500 x 333
    pad = fitted.with_settings(keep_aspect=True, class_threshold=0.0)
    res = pad(rgb, key="car")
    assert res.valid == (85, 128) and res.labels.shape == rgb.shape[:2]
    tiled = fitted.with_settings(tiles=2, tile_size=96, class_threshold=0.0)
    bus = read_image(SAMPLES / "bus.jpg")
    together = tiled.segment([("car", rgb), ("bus", bus)])
    alone = [tiled.segment([("car", rgb)])[0], tiled.segment([("bus", bus)])[0]]
    for a, b in zip(together, alone):
        assert np.array_equal(a.labels, b.labels)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-6)


def test_sd2_fit_and_segment(sd2, car):
    slime = Slime.fit(sd2, [car], CLASSES, FitSettings(epochs=1, segment=SEG), progress=False)
    assert slime.parts.model["family"] == "sd2"
    assert slime.parts.cond.shape == (77, sd2.text_encoder.config.hidden_size)
    res = slime.with_settings(class_threshold=0.0)(read_image(SAMPLES / "bus.jpg"), key="bus")
    assert res.labels.shape == (375, 500) and set(np.unique(res.labels)) <= {0, 1, 2}
