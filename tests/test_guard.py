"""The guard layer (text2mask.guard) and the one mask reader (text2mask.io), on real files.

Rules: an output that is, holds or lies inside an input is refused before any work; a
data-derived name becomes a file name only through ``safe_name``; once checked, the inputs
are protected against every atomic write of the process; masks mean what they look like
(alpha, palette, 16-bit, RGB by one rule, never composited on white); photos are read as
stored (no EXIF orientation), aligned with the datasets' ground truth.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from text2mask import guard as G
from text2mask.errors import ConfigError, InputError
from text2mask.io import read_binary_mask, read_image, read_index_png, write_json, write_text

ROOT = Path(__file__).resolve().parent.parent
VOC = ROOT / "samples" / "voc-mini" / "VOC2012"


@pytest.fixture(autouse=True)
def _release():
    G.release()
    yield
    G.release()


def _tree(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes((VOC / "JPEGImages" / "2007_000032.jpg").read_bytes())
    return photos, photos / "a.jpg"


# --- rule 1: inputs are sacred ---------------------------------------------------------

@pytest.mark.parametrize("case, why", [
    ("same_file", "is the photo"), ("out_is_input_folder", "is the photo folder"),
    ("out_holds_input", "contains the photo folder"), ("out_inside_input", "lies inside the photo folder"),
    ("out_is_folder_of_file", "is the folder of the photo"),
])
def test_outputs_that_touch_an_input_are_refused(case, why, tmp_path):
    photos, photo = _tree(tmp_path)
    g = G.Guard()
    if case == "same_file":
        g.input(photo, "photo")
        g.output_file(photo, "--json", replace=True)
    elif case == "out_is_folder_of_file":
        g.input(photo, "photo")
        g.output_folder(photos)
    else:
        g.input(photos, "photo folder")
        g.output_folder({"out_is_input_folder": photos, "out_holds_input": tmp_path,
                         "out_inside_input": photos / "masks"}[case])
    with pytest.raises(ConfigError, match=why):
        g.check()
    assert sorted(p.name for p in photos.iterdir()) == ["a.jpg"]      # nothing created there


def test_a_sibling_output_is_accepted_and_the_inputs_are_then_protected(tmp_path):
    photos, photo = _tree(tmp_path)
    before = photo.read_bytes()
    g = G.Guard()
    g.input(photos, "photo folder")
    out = g.output_folder(tmp_path / "out")
    g.check()
    assert not out.exists()                                           # probed, not created
    write_json(out / "ok.json", {"a": 1})                             # the output is writable
    with pytest.raises(InputError, match="lies inside the input folder"):
        write_text(photos / "new.txt", "x")                           # nothing new inside an input
    with pytest.raises(InputError, match="refusing to write"):
        write_text(photo, "x")
    assert photo.read_bytes() == before and not (photos / "new.txt").exists()
    G.release()
    write_text(photos / "new.txt", "x")                               # the next command is free again
    assert (photos / "new.txt").read_text() == "x"


def test_protected_file_cannot_be_replaced_through_a_link_or_dotdot(tmp_path):
    photos, photo = _tree(tmp_path)
    g = G.Guard()
    g.input(photo, "photo")
    g.check()
    with pytest.raises(InputError):
        write_text(tmp_path / "photos" / ".." / "photos" / "a.jpg", "x")
    link = tmp_path / "alias.jpg"
    os.symlink(photo, link)
    with pytest.raises(InputError):
        write_text(link, "x")


def test_hub_ids_are_not_files_and_local_models_are_inputs(tmp_path):
    g = G.Guard()
    g.model("stabilityai/stable-diffusion-2-1-base")                  # not a path: skipped
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    g.model(model)
    g.output_folder(model / "unet")
    with pytest.raises(ConfigError, match="lies inside the --model model"):
        g.check()


# --- rule 6: fail before work ----------------------------------------------------------

def test_output_file_conflicts_and_unwritable_folders(tmp_path):
    existing = tmp_path / "car.slime"
    existing.write_text("mine")
    with pytest.raises(ConfigError, match="exists; it is never overwritten"):
        _check_file(existing)
    assert existing.read_text() == "mine"
    with pytest.raises(ConfigError, match="is a folder"):
        _check_file(tmp_path)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    g = G.Guard()
    g.output_folder(a_file)
    with pytest.raises(ConfigError, match="is an existing file, not a folder"):
        g.check()
    g = G.Guard()
    g.output_folder(a_file / "sub")
    with pytest.raises(InputError, match="notes.txt is in the way"):
        g.check()
    if os.geteuid() != 0:            # root writes anywhere: the permission case needs a user
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            g = G.Guard()
            g.output_folder(ro / "out")
            with pytest.raises(InputError, match="not writable"):
                g.check()
        finally:
            ro.chmod(0o700)


def _check_file(path):
    g = G.Guard()
    g.output_file(path, "--out")
    return g.check()


# --- rule 2: nothing outside --out -----------------------------------------------------

@pytest.mark.parametrize("name", ["../../x", "a/b", "a\\b", "..", ".", "", ".hidden", "x\x00y", "tab\there",
                                  "n" * 201])
def test_names_that_would_escape_or_hide_are_refused(name):
    with pytest.raises(ConfigError, match="episode id .* cannot be a file name"):
        G.safe_name(name, "episode id")


@pytest.mark.parametrize("name", ["2007_000032", "<new1>", "my mug", "part-1.v2", "ñandú", "n" * 200])
def test_ordinary_names_pass_unchanged(name):
    assert G.safe_name(name, "token") == name


# --- rule 5: masks mean what they look like --------------------------------------------

def test_binary_rule_on_every_kind_of_picture(tmp_path):
    obj = np.zeros((6, 8), bool)
    obj[1:4, 2:7] = True
    # RGBA: opaque pixels are the object, whatever their colour (a white background that is
    # transparent must not become object, as white compositing would make it)
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[..., 3] = np.where(obj, 255, 0)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert (read_binary_mask(tmp_path / "rgba.png") == obj).all()
    # RGBA fully opaque: the colours decide (a red object on black is object)
    rgba[..., 3] = 255
    rgba[..., :3] = 0
    rgba[obj, 0] = 200
    Image.fromarray(rgba, "RGBA").save(tmp_path / "opaque.png")
    assert (read_binary_mask(tmp_path / "opaque.png") == obj).all()
    # RGB: brightest channel past mid-grey
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[obj] = (0, 0, 128)
    rgb[~obj] = (127, 127, 127)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert (read_binary_mask(tmp_path / "rgb.png") == obj).all()
    # grey, palette, 16-bit, 1-bit: non-zero
    Image.fromarray(obj.astype(np.uint8) * 3).save(tmp_path / "l.png")
    Image.fromarray(obj.astype(np.uint8) * 2).convert("P").save(tmp_path / "p.png")
    Image.fromarray(obj.astype(np.uint16) * 40000).save(tmp_path / "i16.png")
    Image.fromarray(obj).save(tmp_path / "one.png")
    for name in ("l", "p", "i16", "one"):
        assert (read_binary_mask(tmp_path / f"{name}.png") == obj).all(), name
    # with a class index: only that index of an index mask
    idx = obj.astype(np.uint8) * 2
    idx[0, 0] = 1
    Image.fromarray(idx).save(tmp_path / "idx.png")
    assert (read_binary_mask(tmp_path / "idx.png", cls=2) == obj).all()
    assert read_binary_mask(tmp_path / "idx.png", cls=1).sum() == 1


def test_index_rule_refuses_colours_and_keeps_grey_and_palette(tmp_path):
    gt = VOC / "SegmentationClass" / "2007_000032.png"
    with Image.open(gt) as im:
        assert im.mode == "P"
        want = np.asarray(im)
    assert (read_index_png(gt) == want).all()                       # palette indices, not colours
    grey_rgb = np.repeat(want[..., None], 3, axis=2)
    Image.fromarray(grey_rgb).save(tmp_path / "grey.png")
    assert (read_index_png(tmp_path / "grey.png") == want).all()     # grey RGB: its levels
    with Image.open(gt) as im:
        im.convert("RGB").save(tmp_path / "colour.png")
    with pytest.raises(InputError, match="colour.png: not a single-channel index mask"):
        read_index_png(tmp_path / "colour.png")
    rgba = np.dstack([grey_rgb, np.full(want.shape, 255, np.uint8)])
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "holes.png")
    with pytest.raises(InputError, match="transparency"):
        read_index_png(tmp_path / "holes.png")
    Image.fromarray(np.full((4, 4), 300, np.uint16)).save(tmp_path / "big.png")
    with pytest.raises(InputError, match="outside 0..255"):
        read_index_png(tmp_path / "big.png")
    with pytest.raises(InputError, match="mask file not found"):
        read_index_png(tmp_path / "none.png")


# --- the EXIF rule: stored pixels, aligned with the ground truth ------------------------

def test_an_exif_rotated_jpeg_is_read_as_stored_and_matches_its_ground_truth(tmp_path):
    """A real VOC photo saved with Orientation 6 (display rotated 90 degrees): read_image
    gives the stored pixels, whose shape is that of the VOC ground truth, as the official
    code and the dataset's annotation tools see it."""
    src = VOC / "JPEGImages" / "2007_000032.jpg"
    gt = read_index_png(VOC / "SegmentationClass" / "2007_000032.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    with Image.open(src) as im:
        stored = np.asarray(im.convert("RGB"))
        im.save(tmp_path / "rotated.jpg", "JPEG", quality=100, exif=exif)
    with Image.open(tmp_path / "rotated.jpg") as im:
        assert im.getexif()[0x0112] == 6
        again = np.asarray(im.convert("RGB"))
    rgb = read_image(tmp_path / "rotated.jpg")
    assert rgb.shape[:2] == gt.shape == stored.shape[:2] != stored.shape[1::-1]
    assert (rgb == again).all()
