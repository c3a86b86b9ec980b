"""Bad and unusual inputs to `text2mask generate`, on real VOC photos with the tiny model.

Per-image problems (a file that is missing, empty, truncated, not an image; ground truth
with a value outside the class list) fail THAT image: a message naming the file and the
cause, an entry (id, stage, error) in failures.jsonl, exit code 1, and every other image
still gets masks/, initial/ and crf/. Unusual but valid photos (grayscale, RGBA, CMYK,
16-bit, palette, EXIF-tagged, 8x8, 5000x100, huge) are written at their stored size
(the EXIF orientation tag is not applied: README, Inputs). Configuration errors exit 2 with one message before any model work.

The tiny model costs seconds per image whatever the photo size (the UNet always sees a
704..1024-pixel side), so the per-image failures share ONE run (one good image among
the bad ones) and every other case runs a single image.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from text2mask.wsss import propagate as P
from text2mask.cli import app
from text2mask.data.folder import load_folder
from text2mask.io import read_image
from text2mask.preprocess import geometry
from text2mask.wsss.run import RunOptions, generate

VOC = Path(__file__).resolve().parent.parent / "samples" / "voc-mini" / "VOC2012"
GOOD = "2007_000032"        # 500 x 281, aeroplane + person
GOOD_CLASSES = {0, 1, 15}
OTHER = "2007_000039"       # 500 x 375, tvmonitor
FOLDERS = ("initial", "crf", "masks")


def photo(i: str = GOOD) -> Image.Image:
    with Image.open(VOC / "JPEGImages" / f"{i}.jpg") as im:
        return im.convert("RGB")


def assert_written(out: Path, key: str, size_hw: tuple[int, int], classes=None) -> dict[str, np.ndarray]:
    """initial/, crf/ and masks/ hold an 8-bit single-channel PNG of ``size_hw`` for ``key``."""
    got = {}
    for folder in FOLDERS:
        path = out / folder / f"{key}.png"
        assert path.is_file(), f"{path} was not written"
        with Image.open(path) as im:
            assert im.mode == "L", (path, im.mode)
            a = np.asarray(im)
        assert a.shape == tuple(size_hw), (path, a.shape, size_hw)
        if classes is not None:
            allowed = set(classes) | ({255} if folder == "masks" else set())
            assert set(np.unique(a).tolist()) <= allowed, (path, np.unique(a))
        got[folder] = a
    return got


def assert_not_written(out: Path, key: str) -> None:
    for folder in FOLDERS:
        assert not (out / folder / f"{key}.png").exists(), f"{folder}/{key}.png written for a failed image"


def failures(out: Path) -> dict[str, dict]:
    path = out / "failures.jsonl"
    if not path.is_file():
        return {}
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in recs:
        assert set(r) >= {"id", "stage", "error"}, r
    return {r["id"]: r for r in recs}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# --------------------------------------------------------------------------------------
# Per-image failures: one CLI run over a VOC tree with one good image and the bad ones.
# --------------------------------------------------------------------------------------

BAD_IMAGES = {
    # id: (how the JPEG is broken, text the message must contain)
    "missing_file": ("missing", "not found"),
    "zero_bytes": ("empty", "empty (0 bytes)"),
    "truncated": ("truncated", "truncated"),
    "not_an_image": ("text", "cannot decode image"),
}
BAD_GT = "gt_value_30"


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory, tiny_model_dir, make_voc_tree):
    """`text2mask generate` over GOOD plus every broken input; GOOD listed twice."""
    base = tmp_path_factory.mktemp("bad")
    ids = [GOOD, *BAD_IMAGES, BAD_GT, GOOD]          # GOOD twice: a duplicate id
    root = make_voc_tree(base / "VOC2012", [GOOD, OTHER], splits={"train": ids})
    jpg, gt = root / "JPEGImages", root / "SegmentationClass"
    other_gt = (gt / f"{OTHER}.png").read_bytes()
    real_jpeg = (jpg / f"{OTHER}.jpg").read_bytes()
    for key, (kind, _) in BAD_IMAGES.items():
        (gt / f"{key}.png").write_bytes(other_gt)    # labels are fine: the image is the problem
        if kind == "empty":
            (jpg / f"{key}.jpg").write_bytes(b"")
        elif kind == "truncated":
            (jpg / f"{key}.jpg").write_bytes(real_jpeg[: len(real_jpeg) // 2])
        elif kind == "text":
            (jpg / f"{key}.jpg").write_text("<html><body>404 Not Found</body></html>\n")
    # A fine photo whose ground truth holds 30, outside VOC's 0..20 (and not 255).
    (jpg / f"{BAD_GT}.jpg").write_bytes(real_jpeg)
    labels = np.array(Image.open(gt / f"{OTHER}.png"))
    labels[:20, :20] = 30
    Image.fromarray(labels).save(gt / f"{BAD_GT}.png")
    (gt / f"{OTHER}.png").unlink()
    (jpg / f"{OTHER}.jpg").unlink()

    out = base / "out"
    res = invoke("generate", "--data-root", root, "--split", "train", "--model", tiny_model_dir,
                 "--device", "cpu", "--out", out, "--workers", "0", "--no-progress")
    return res, root, out


@pytest.mark.parametrize("key", list(BAD_IMAGES))
def test_bad_image_file_fails_that_image_only(bad_run, key):
    res, root, out = bad_run
    path = root / "JPEGImages" / f"{key}.jpg"
    cause = BAD_IMAGES[key][1]
    rec = failures(out).get(key)
    assert rec is not None, f"no failures.jsonl entry for {key}: {failures(out)}"
    assert rec["stage"] == "read"
    assert str(path) in rec["error"] and cause in rec["error"], rec
    # The CLI names the file and the cause too (it lists up to 5 failures; there are 5).
    line = next((ln for ln in res.output.splitlines() if f"{key} [read]" in ln), None)
    assert line is not None and str(path) in line and cause in line, res.output
    assert_not_written(out, key)
    assert_written(out, GOOD, (281, 500), GOOD_CLASSES)


def test_ground_truth_value_outside_class_list_fails_that_image(bad_run):
    res, root, out = bad_run
    gt = root / "SegmentationClass" / f"{BAD_GT}.png"
    rec = failures(out).get(BAD_GT)
    assert rec is not None, failures(out)
    assert rec["stage"] == "read"
    assert str(gt) in rec["error"] and "30" in rec["error"] and "outside the class list" in rec["error"], rec
    assert str(gt) in res.output
    assert_not_written(out, BAD_GT)
    assert_written(out, GOOD, (281, 500), GOOD_CLASSES)


def test_duplicate_id_processed_once_with_a_note(bad_run):
    res, root, out = bad_run
    split = root / "ImageSets" / "Segmentation" / "train.txt"
    note = next((ln for ln in res.output.splitlines() if ln.startswith("note:") and "duplicate" in ln), None)
    assert note is not None and str(split) in note and GOOD in note, res.output
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["dataset"]["images"] == 1 + len(BAD_IMAGES) + 1        # GOOD counted once
    assert "done: 1 written" in res.output
    assert sorted(p.name for p in (out / "masks").glob("*.png")) == [f"{GOOD}.png"]


def test_cli_exits_1_and_prints_summary_when_images_fail(bad_run):
    res, root, out = bad_run
    assert res.exit_code == 1, res.output
    n_bad = len(BAD_IMAGES) + 1
    assert "done: 1 written" in res.output and f"{n_bad} failed" in res.output, res.output
    assert f"{n_bad} image(s) failed; see {out / 'failures.jsonl'}" in res.output
    assert set(failures(out)) == {*BAD_IMAGES, BAD_GT}
    # The image that worked was still evaluated against its ground truth.
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 1 and metrics["masks"]["images"] == 1


# --------------------------------------------------------------------------------------
# Unusual but valid photos: one image each, in process, through the folder dataset.
# --------------------------------------------------------------------------------------

def run_folder(predictor, folder: Path, labels: dict, out: Path, **opts):
    labels_file = folder.parent / "labels.json"
    labels_file.write_text(json.dumps(labels))
    ds = load_folder(folder, labels_file, "voc")
    logs: list[str] = []
    summary = generate(predictor, ds, RunOptions(out=out, workers=0, progress=False, **opts), log=logs.append)
    return summary, logs


def _grayscale(folder):
    p = folder / "gray.png"
    photo().convert("L").save(p)
    return p, "L", (281, 500)


def _rgba(folder):
    p = folder / "rgba.png"
    im = photo().convert("RGBA")
    alpha = np.full((281, 500), 255, np.uint8)
    alpha[:, :250] = 0                               # left half fully transparent
    im.putalpha(Image.fromarray(alpha))
    im.save(p)
    return p, "RGBA", (281, 500)


def _cmyk(folder):
    p = folder / "cmyk.jpg"
    photo().convert("CMYK").save(p, "JPEG", quality=95)
    return p, "CMYK", (281, 500)


def _sixteen_bit(folder):
    p = folder / "gray16.png"
    Image.fromarray(np.asarray(photo().convert("L")).astype(np.uint16) * 257).save(p)
    return p, "I;16", (281, 500)


def _palette(folder):
    p = folder / "palette.png"
    photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(p)
    return p, "P", (281, 500)


def _exif_rotated(folder):
    p = folder / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6                                 # Orientation: rotate 90 CW to display
    photo().save(p, "JPEG", quality=95, exif=exif)
    return p, "RGB", (281, 500)                      # the STORED size: the tag is not applied


def _eight_by_eight(folder):
    p = folder / "tiny.png"
    photo().resize((8, 8), Image.BOX).save(p)
    return p, "RGB", (8, 8)


def _very_wide(folder):
    p = folder / "wide.png"
    photo().resize((5000, 100), Image.BILINEAR).save(p)
    return p, "RGB", (100, 5000)


FORMATS = {"grayscale": _grayscale, "rgba": _rgba, "cmyk": _cmyk, "16bit": _sixteen_bit,
           "palette": _palette, "exif_rotated": _exif_rotated, "8x8": _eight_by_eight,
           "5000x100": _very_wide}


@pytest.mark.parametrize("case", list(FORMATS))
def test_unusual_photo_is_written_at_its_displayed_size(case, voc_predictor, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    path, mode, size_hw = FORMATS[case](folder)
    with Image.open(path) as im:
        assert im.mode == mode, f"test setup: {path.name} opened as {im.mode}, not {mode}"
        stored = np.asarray(im.convert("RGB")) if mode in ("RGB", "L", "CMYK", "P") else None

    rgb = read_image(path)
    assert rgb.shape == (*size_hw, 3) and rgb.dtype == np.uint8
    if case == "rgba":          # composited on white, like an image viewer
        assert (rgb[:, :250] == 255).all()
        assert (rgb[:, 250:] == np.asarray(photo())[:, 250:]).all()
    elif case == "16bit":       # scaled to 8 bits, not clipped at 255
        assert (rgb[..., 0] == np.asarray(photo().convert("L"))).all()
    elif case == "exif_rotated":  # the stored pixels, as the datasets' ground truth is aligned
        assert stored.shape == (281, 500, 3)
        assert (rgb == stored).all()
    elif case in ("grayscale", "cmyk", "palette"):
        assert (rgb == stored).all()

    out = tmp_path / "out"
    summary, logs = run_folder(voc_predictor, folder, {path.name: ["aeroplane", "person"]}, out)
    assert (summary.done, summary.failed) == (1, 0), (summary.failures, logs)
    assert failures(out) == {}
    assert_written(out, path.stem, size_hw, GOOD_CLASSES)


def test_large_photo_is_worked_on_shrunk_and_written_full_size(voc_predictor, tmp_path, monkeypatch):
    """3000 x 2000 with max_pixels=1,000,000 stands for the 8000 x 6000 camera photo under the
    default 4,000,000: the same code path (shrink before the model and CRF, masks resized
    back to the full size when written), only slower."""
    folder = tmp_path / "photos"
    folder.mkdir()
    photo(OTHER).resize((3000, 2000), Image.BILINEAR).save(folder / "big.jpg", quality=90)
    seen = []
    attend = voc_predictor.attend

    def spy(items):
        seen.extend(rgb.shape[:2] for _, rgb, _ in items)
        return attend(items)

    monkeypatch.setattr(voc_predictor, "attend", spy)
    out = tmp_path / "out"
    summary, logs = run_folder(voc_predictor, folder, {"big.jpg": ["tvmonitor"]}, out, max_pixels=1_000_000)
    assert (summary.done, summary.failed) == (1, 0), (summary.failures, logs)
    assert len(seen) == 1 and seen[0][0] * seen[0][1] <= 1_000_000, seen
    assert abs(seen[0][1] / seen[0][0] - 1.5) < 0.01            # aspect ratio kept
    assert_written(out, "big", (2000, 3000), {0, 20})


def test_photo_without_labels_gets_all_background_mask(voc_predictor, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    photo(OTHER).save(folder / "empty_scene.jpg", quality=95)
    out = tmp_path / "out"
    summary, logs = run_folder(voc_predictor, folder, {"empty_scene.jpg": []}, out)
    assert (summary.done, summary.no_labels, summary.failed) == (1, 1, 0), (summary, logs)
    assert failures(out) == {}
    for folder_name, a in assert_written(out, "empty_scene", (375, 500)).items():
        assert (a == 0).all(), f"{folder_name}/ is not all background"
    assert any("empty_scene" in ln and "no image-level labels" in ln and "all-background" in ln for ln in logs), logs


# --------------------------------------------------------------------------------------
# Evaluation against a ground truth of another size.
# --------------------------------------------------------------------------------------

def test_evaluate_ground_truth_of_another_size_fails_naming_the_file(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    Image.fromarray(np.zeros((281, 500), np.uint8)).save(pred / f"{GOOD}.png")
    with Image.open(VOC / "SegmentationClass" / f"{OTHER}.png") as im:   # 500 x 375
        im.save(gt / f"{GOOD}.png")
    res = invoke("evaluate", "--pred", pred, "--gt", gt)
    assert res.exit_code != 0
    assert res.exit_code == 2, res.output
    assert str(gt / f"{GOOD}.png") in res.output and "size mismatch" in res.output, res.output
    assert "500x375" in res.output and "500x281" in res.output


# --------------------------------------------------------------------------------------
# A class map with no contour / constant values: no NaN anywhere.
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("box_threshold", [0.2, None])
@pytest.mark.parametrize("cross_value", [0.0, 0.37])
def test_constant_class_maps_give_finite_scores_and_a_valid_mask(box_threshold, cross_value):
    geo = geometry(281, 500)
    grid = (geo.latent[0] // 2, geo.latent[1] // 2)
    n = grid[0] * grid[1]
    self_attn = torch.full((n, n), 1.0 / n)                       # uniform self-attention
    cross = torch.full((2, *grid), cross_value)                   # two classes, flat maps
    sc = P.propagate(self_attn, cross, box_threshold)
    assert torch.isfinite(sc).all()
    for tau, power in ((1.0, 2.0), (0.7, 1.5)):
        scores = P.scores_with_background(sc, tau, power)
        assert torch.isfinite(scores).all()
        labels, full = P.to_image(scores, (1, 15), geo)
        assert np.isfinite(full).all()
        assert labels.shape == (281, 500) and full.shape == (3, 281, 500)
        assert set(np.unique(labels).tolist()) <= {0, 1, 15}
        assert (labels == 0).all()          # nothing stands out: background everywhere


def test_single_peak_class_map_gives_finite_scores():
    """One hot cell (a degenerate 'contour') and a flat second class."""
    grid = (8, 8)
    self_attn = torch.eye(64)
    cross = torch.zeros((2, *grid))
    cross[0, 3, 4] = 1.0
    sc = P.propagate(self_attn, cross, 0.2)
    scores = P.scores_with_background(sc, 1.0, 2.0)
    assert torch.isfinite(scores).all()
    assert sc[0, 3, 4] == 1.0 and (sc[1] == 0).all()


# --------------------------------------------------------------------------------------
# Configuration errors: exit 2, one message, before any model work.
# --------------------------------------------------------------------------------------

@pytest.fixture
def model_loads(monkeypatch):
    """Records every model load the CLI starts (and lets it go ahead)."""
    from text2mask.wsss.predictor import Text2Mask

    calls = []
    original = Text2Mask.from_pretrained.__func__

    def spy(cls, model, *args, **kwargs):
        calls.append(model)
        return original(cls, model, *args, **kwargs)

    monkeypatch.setattr(Text2Mask, "from_pretrained", classmethod(spy))
    return calls


@pytest.fixture
def config_case(tmp_path, tiny_model_dir, make_voc_tree):
    root = make_voc_tree(tmp_path / "VOC2012", [GOOD])
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / f"{GOOD}.jpg").write_bytes((VOC / "JPEGImages" / f"{GOOD}.jpg").read_bytes())
    out_file = tmp_path / "out-is-a-file"
    out_file.write_text("not a folder\n")
    garbage = tmp_path / "labels-garbage.json"
    garbage.write_bytes(b"\xff\xfe\x00\x89PNG\r\n\x1a\n\x00\x00garbage")
    locked = tmp_path / "labels-locked.json"       # made unreadable in the test (we may be root)
    locked.write_text(json.dumps({f"{GOOD}.jpg": ["aeroplane"]}))
    unknown = tmp_path / "labels-unknown.json"
    unknown.write_text(json.dumps({f"{GOOD}.jpg": ["aeroplane", "unicorn"]}))
    voc = ["--dataset", "voc", "--data-root", root, "--split", "train"]
    fold = ["--dataset", "folder", "--images", folder, "--prompts", "voc"]
    model = ["--model", tiny_model_dir, "--device", "cpu"]
    out = ["--out", tmp_path / "out"]
    return {
        # case: (arguments, texts the one error line must contain)
        "missing_data_root": ([*voc[:2], "--data-root", tmp_path / "no-such-VOC2012", *model, *out],
                              [str(tmp_path / "no-such-VOC2012"), "does not exist"]),
        "no_data_root_given": ([*model, *out], ["--data-root", "required"]),
        "unknown_split": ([*voc[:4], "--split", "bogus", *model, *out], ["'bogus'", "unknown VOC split"]),
        "unreadable_labels_file": ([*fold, "--labels", garbage, *model, *out], [str(garbage), "not valid JSON"]),
        "labels_permission_denied": ([*fold, "--labels", locked, *model, *out], [str(locked), "Permission denied"]),
        "prompts_is_a_directory": ([*voc, "--prompts", folder, *model, *out], [str(folder)]),
        "missing_labels_file": ([*fold, "--labels", tmp_path / "nope.json", *model, *out],
                                [str(tmp_path / "nope.json"), "not found"]),
        "unknown_class_name": ([*fold, "--labels", unknown, *model, *out], [str(unknown), "unknown class name 'unicorn'"]),
        "model_path_missing": ([*voc, "--model", tmp_path / "no-such-model", "--device", "cpu", *out],
                               [str(tmp_path / "no-such-model"), "no such local folder"]),
        "out_is_a_file": ([*voc, *model, "--out", out_file], [str(out_file), "is an existing file, not a folder"]),
    }


CONFIG_CASES = ["missing_data_root", "no_data_root_given", "unknown_split", "unreadable_labels_file",
                "labels_permission_denied", "prompts_is_a_directory", "missing_labels_file", "unknown_class_name", "model_path_missing",
                "out_is_a_file"]


def deny_reading(monkeypatch, path: Path) -> None:
    """What a labels file without read permission does for a normal user (chmod 000 does
    not stop root): opening it raises PermissionError."""
    real_read_text, real_read_bytes, real_open = Path.read_text, Path.read_bytes, Path.open

    def refuse(real):
        def wrapped(self, *args, **kwargs):
            if Path(self) == path:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(Path, "read_text", refuse(real_read_text))
    monkeypatch.setattr(Path, "read_bytes", refuse(real_read_bytes))
    monkeypatch.setattr(Path, "open", refuse(real_open))


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_error_exits_2_with_one_clear_message(case, config_case, model_loads, tmp_path, monkeypatch):
    args, texts = config_case[case]
    if case == "labels_permission_denied":
        deny_reading(monkeypatch, tmp_path / "labels-locked.json")
    res = invoke("generate", *args, "--workers", "0", "--no-progress")
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    for text in texts:
        assert text in errors[0], (text, errors[0])
    assert "Traceback" not in res.output
    if case != "model_path_missing":         # the guard refuses a file --out before the model
        assert model_loads == [], f"the model was loaded before the configuration error: {model_loads}"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unwritable_output_is_reported_before_the_model_is_loaded(config_case, model_loads, tmp_path):
    """With a real SD v1 the load takes tens of seconds (or a multi-GB download) before a
    `--out` that can never be written is reported; the check needs no model."""
    args, texts = config_case["out_is_a_file"]
    res = invoke("generate", *args, "--workers", "0", "--no-progress")
    assert res.exit_code == 2, res.output
    assert model_loads == [], (
        "`--out` pointing at a file is only reported after the model was loaded "
        f"(loaded: {model_loads}); see the report for the suggested fix")
