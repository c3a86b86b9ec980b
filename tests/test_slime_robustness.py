"""Issue 21's rules on `text2mask slime fit | segment | import | evaluate`, through the
real CLI: inputs are never written, data names become file names only when safe,
artefacts are schema-checked on load, masks are read by the one index reader, and every
option / output problem is found before the model loads. Commands that should fail
early get ``--model /no/such/model``: had they reached the model, the error would name it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from text2mask.cli import app
from text2mask.errors import EXIT_CONFIG, EXIT_FAILED_ITEMS, InputError
from text2mask.io import read_index_png
from text2mask.slime.artifact import META_KEY, load_parts
from text2mask.slime.examples import pair_folder, read_example

SAMPLES = Path(__file__).resolve().parent.parent / "samples/slime-mini"
CAR, CAR_MASK, BUS, BUS_MASK = (SAMPLES / n for n in ("car.jpg", "car.png", "bus.jpg", "bus.png"))
CLASSES = "background,top,bottom"
NO_MODEL = "/no/such/model"

pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error(res, *texts, code=EXIT_CONFIG) -> str:
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr
    for t in texts:
        assert t in lines[0], (t, lines[0])
    assert NO_MODEL not in lines[0], "the model was reached before the error"
    return lines[0]


def fit(out, *extra, model=NO_MODEL, image=CAR, mask=CAR_MASK):
    return invoke("slime", "fit", "--image", image, "--mask", mask, "--classes", CLASSES, "--model", model,
                  "--out", out, "--device", "cpu", "--no-progress", *extra)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A private copy of the sample pairs (tests may not touch the repo's files)."""
    d = tmp_path_factory.mktemp("slime-data")
    for p in (CAR, CAR_MASK, BUS, BUS_MASK):
        shutil.copy(p, d / p.name)
    return d


@pytest.fixture(scope="module")
def fitted(tiny_model_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("slime-fit") / "p.slime"
    res = fit(out, "--epochs", "1", "--canvas", "64", model=tiny_model_dir, image=data / "car.jpg",
              mask=data / "car.png")
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def segmented(tiny_model_dir, fitted, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("slime-seg") / "seg"
    res = invoke("slime", "segment", data / "car.jpg", data / "bus.jpg", "--parts", fitted, "--model",
                 tiny_model_dir, "--out", out, "--workers", "0", "--device", "cpu", "--no-progress")
    assert res.exit_code == 0, res.output
    return out


# -- 1. inputs are sacred ----------------------------------------------------------------
def test_evaluate_json_never_overwrites_ground_truth_or_predictions(segmented, data):
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    preds = {p.name: p.read_bytes() for p in (segmented / "masks").iterdir()}
    one_error(invoke("slime", "evaluate", "--pred", segmented / "masks", "--gt", data, "--json", data / "car.png"),
              "--json", "car.png", "ground-truth folder")
    one_error(invoke("slime", "evaluate", "--pred", segmented / "masks", "--gt", data,
                     "--json", segmented / "masks" / "car.png"), "prediction folder")
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before
    assert {p.name: p.read_bytes() for p in (segmented / "masks").iterdir()} == preds


def test_fit_refuses_an_out_among_its_inputs(data, tmp_path):
    mask_bytes = (data / "car.png").read_bytes()
    one_error(fit(data / "car.png", "--overwrite", image=data / "car.jpg", mask=data / "car.png"),
              "--out", "is the training photo or mask")
    one_error(invoke("slime", "fit", "--train-dir", data, "--classes", CLASSES, "--model", NO_MODEL,
                     "--out", data / "new.slime"), "lies inside the --train-dir folder")
    assert (data / "car.png").read_bytes() == mask_bytes and not (data / "new.slime").exists()


def test_segment_refuses_an_out_that_holds_or_is_an_input(fitted, data, tmp_path):
    one_error(invoke("slime", "segment", data / "car.jpg", "--parts", fitted, "--out", data, "--model", NO_MODEL),
              "is the folder of the photo")
    inside = tmp_path / "run" / "masks"
    inside.mkdir(parents=True)
    shutil.copy(CAR, inside / "car.jpg")
    one_error(invoke("slime", "segment", inside / "car.jpg", "--parts", fitted, "--out", tmp_path / "run",
                     "--model", NO_MODEL), "contains the photo")
    one_error(invoke("slime", "segment", data / "car.jpg", "--parts", fitted, "--out", fitted, "--model", NO_MODEL),
              "is the parts file")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    one_error(invoke("slime", "segment", data / "car.jpg", "--parts", fitted, "--out", a_file, "--model", NO_MODEL),
              "is an existing file, not a folder")


def test_import_refuses_an_out_inside_the_official_folder(tmp_path):
    folder = tmp_path / "official"
    folder.mkdir()
    torch.save(torch.zeros(1, 1, 32), folder / "embedding_0.pth")
    one_error(invoke("slime", "import", folder, "--out", folder / "x.slime", "--model", NO_MODEL),
              "lies inside the official checkpoint folder")
    (folder / "embedding_0.pth").rename(folder / "embedding_1.pth")
    one_error(invoke("slime", "import", folder, "--out", tmp_path / "x.slime", "--model", NO_MODEL),
              "embedding_0.pth is missing")


# -- 2. names from data ------------------------------------------------------------------
def test_a_photo_id_that_cannot_be_a_file_name_is_refused(fitted, tmp_path):
    hidden = tmp_path / ".car.jpg"
    shutil.copy(CAR, hidden)
    one_error(invoke("slime", "segment", hidden, "--parts", fitted, "--out", tmp_path / "o", "--model", NO_MODEL),
              "photo id", "'.car'", "cannot be a file name")


# -- 4. artefacts validated on load -------------------------------------------------------
def rewrite(src: Path, dst: Path, meta_change=None, cond=None) -> Path:
    p = load_parts(src)
    meta = p.metadata()
    if meta_change:
        meta_change(meta)
    save_file({"cond": p.cond if cond is None else cond, "uncond": p.uncond}, str(dst),
              metadata={META_KEY: json.dumps(meta)})
    return dst


@pytest.mark.parametrize("case, change, field", [
    ("no-classes", lambda m: m.pop("classes"), "field classes"),
    ("classes-not-str", lambda m: m.update(classes=["background", 3, "bottom"]), "field classes"),
    ("rows-mismatch", lambda m: m.update(classes=["background", "top"]), "field learned_rows"),
    ("bad-tiles", lambda m: m["settings"]["segment"].update(tiles=0), "field settings.segment"),
    ("bad-threshold", lambda m: m["settings"]["segment"].update(class_threshold="high"), "field settings.segment"),
    ("unknown-segment-key", lambda m: m["settings"]["segment"].update(colour=1), "field settings.segment"),
    ("bad-lr-type", lambda m: m["settings"].update(lr="fast"), "field settings.lr"),
    ("bad-width", lambda m: m["model"].update(hidden_size=7), "field model.hidden_size"),
    ("bad-iou", lambda m: m.update(validation_iou=250.0), "field validation_iou"),
])
def test_a_malformed_parts_file_exits_2_naming_the_field(fitted, tmp_path, case, change, field):
    bad = rewrite(fitted, tmp_path / f"{case}.slime", change)
    with pytest.raises(InputError, match=field):
        load_parts(bad)
    one_error(invoke("slime", "segment", CAR, "--parts", bad, "--out", tmp_path / "o", "--model", NO_MODEL),
              str(bad), field)


def test_nan_rows_are_refused(fitted, tmp_path):
    cond = load_parts(fitted).cond.clone()
    cond[1, 0] = float("nan")
    bad = rewrite(fitted, tmp_path / "nan.slime", cond=cond)
    one_error(invoke("slime", "segment", CAR, "--parts", bad, "--out", tmp_path / "o", "--model", NO_MODEL),
              "field cond", "non-finite")


def test_a_diverging_fit_exits_1_and_writes_no_parts_file(tiny_model_dir, tmp_path):
    """lr 1e9 stays finite on the tiny random model (the loss reaches ~1e7); 1e20 does not."""
    out = tmp_path / "p.slime"
    res = fit(out, "--lr", "1e20", "--epochs", "3", "--canvas", "64", "--select", "last", model=tiny_model_dir)
    assert res.exit_code == EXIT_FAILED_ITEMS, res.output
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "diverged" in errors[0] and "no parts file is written" in errors[0]
    assert not out.exists() and not out.with_name("p.slime.history.json").exists()


# -- 5. masks mean what they look like ---------------------------------------------------
def test_a_transparent_rgba_mask_is_refused_and_a_grey_rgb_one_read_as_indices(tmp_path):
    labels = read_index_png(CAR_MASK)
    rgba = np.zeros(labels.shape + (4,), np.uint8)
    rgba[..., :3] = labels[..., None]
    rgba[..., 3] = np.where(labels > 0, 255, 0)          # transparent background: never composited
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    one_error(fit(tmp_path / "p.slime", mask=tmp_path / "rgba.png"), "rgba.png", "not a single-channel index mask")
    Image.fromarray(np.repeat(labels[..., None], 3, axis=2), "RGB").save(tmp_path / "grey.png")
    ex = read_example(CAR, tmp_path / "grey.png", CLASSES.split(","))
    assert np.array_equal(ex.mask, labels)
    np.save(tmp_path / "car.npy", labels.astype(np.int64))
    assert np.array_equal(read_example(CAR, tmp_path / "car.npy", CLASSES.split(",")).mask, labels)


# -- 6. fail before work -----------------------------------------------------------------
@pytest.mark.parametrize("extra, texts", [
    (("--lr", "nan"), ("--lr nan", "finite")),
    (("--lr", "0"), ("--lr 0",)),
    (("--epochs", "0"), ("--epochs 0",)),
    (("--canvas", "100"), ("--canvas 100", "multiple of 64")),
    (("--canvas", "64", "--tile-size", "128"), ("--tile-size 128",)),
    (("--min-crop", "0"), ("--min-crop 0",)),
    (("--t-range", "50", "10"), ("--t-range 50 10",)),
    (("--rotate", "200"), ("--rotate 200",)),
    (("--mixed-precision", "fp8"), ("--mixed-precision fp8",)),
    (("--select", "last", "--val-image", str(BUS), "--val-mask", str(BUS_MASK)), ("--select last",)),
])
def test_bad_fit_options_exit_2_before_the_model(tmp_path, extra, texts):
    one_error(fit(tmp_path / "p.slime", *extra), *texts)
    assert not (tmp_path / "p.slime").exists()


def test_fit_outputs_are_checked_before_the_model(tmp_path):
    folder = tmp_path / "dir.slime"
    folder.mkdir()
    one_error(fit(folder), "is a folder")
    existing = tmp_path / "old.slime"
    existing.write_bytes(b"an earlier fit")
    one_error(fit(existing), "exists", "--overwrite")
    res = fit(existing, "--overwrite")             # allowed now: it gets as far as the model
    assert res.exit_code == EXIT_CONFIG and NO_MODEL in res.stderr
    assert existing.read_bytes() == b"an earlier fit"
    # /proc cannot hold new folders, even for root (chmod would not stop root)
    one_error(fit(Path("/proc/text2mask-test/p.slime")), "not writable")


def test_segment_declares_the_model_recorded_in_the_parts_file(fitted, tiny_model_dir, tmp_path):
    """Without --model, segment loads the fit's local model folder: an input too."""
    one_error(invoke("slime", "segment", CAR, "--parts", fitted, "--out", Path(tiny_model_dir) / "seg"),
              "lies inside the --model model")


def test_segment_options_are_checked_before_the_model(fitted, tmp_path):
    for extra, text in ((("--tiles", "0"), "--tiles 0"), (("--tile-size", "100"), "--tile-size 100"),
                        (("--class-threshold", "nan"), "--class-threshold nan"), (("--t", "1000"), "--t 1000")):
        one_error(invoke("slime", "segment", CAR, "--parts", fitted, "--out", tmp_path / "o", "--model", NO_MODEL,
                         *extra), text)


# -- folder inputs, presets, history -----------------------------------------------------
def test_pair_folder_rule(tmp_path):
    official = tmp_path / "official"
    official.mkdir()
    for stem in ("a", "b"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(official / f"{stem}.png")
        np.save(official / f"{stem}.npy", np.zeros((4, 4), np.uint8))
    (official / "README.md").write_text("ignored")
    assert pair_folder(official) == [(official / "a.png", official / "a.npy"), (official / "b.png", official / "b.npy")]
    ours = tmp_path / "ours"
    ours.mkdir()
    shutil.copy(CAR, ours / "car.jpg")
    shutil.copy(CAR_MASK, ours / "car.png")
    assert pair_folder(ours) == [(ours / "car.jpg", ours / "car.png")]
    shutil.copy(BUS, ours / "bus.jpg")
    with pytest.raises(InputError, match="bus.jpg has no mask"):
        pair_folder(ours)
    shutil.copy(BUS_MASK, ours / "bus.png")
    assert pair_folder(ours) == [(ours / "bus.jpg", ours / "bus.png"), (ours / "car.jpg", ours / "car.png")]
    shutil.copy(BUS, ours / "bus.webp")
    with pytest.raises(InputError, match="several photos"):
        pair_folder(ours)


def test_train_dir_val_dir_preset_and_history(tiny_model_dir, tmp_path):
    train, val = tmp_path / "train", tmp_path / "val"
    train.mkdir(), val.mkdir()
    for p in (CAR, CAR_MASK):
        shutil.copy(p, train / p.name)
    for p in (BUS, BUS_MASK):
        shutil.copy(p, val / p.name)
    out = tmp_path / "fit" / "p.slime"
    args = ("slime", "fit", "--train-dir", train, "--val-dir", val, "--classes", CLASSES, "--model", tiny_model_dir,
            "--out", out, "--epochs", "2", "--canvas", "64", "--device", "cpu", "--no-progress")
    res = invoke(*args, "--preset", "celeba", "--rotate", "5")
    assert res.exit_code == 0, res.output
    s = load_parts(out).settings
    # celeba: +-10 degrees (overridden here), 2 x 2 tiles of 400 on 512 -> 50 on the 64 canvas, min crop 0.6
    assert (s["rotate"], s["min_crop"], s["segment"]["tiles"], s["segment"]["tile_size"]) == (5, 0.6, 2, 50)
    history = json.loads(out.with_name("p.slime.history.json").read_text())
    assert history["validation"] == "the validation pairs" and len(history["epochs"]) == 2
    assert [set(e) for e in history["epochs"]] == [{"epoch", "steps", "ce", "mse", "sd", "total", "validation_iou"}] * 2
    assert history["best_epoch"] == load_parts(out).best_epoch
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]    # atomic writes leave no temp files
    one_error(invoke("slime", "fit", "--train-dir", train, "--classes", CLASSES, "--model", NO_MODEL,
                     "--out", tmp_path / "q.slime", "--preset", "celeba", "--canvas", "64", "--tile-size", "80"),
              "--tile-size 80")


def test_segment_preset_sets_the_tiling(tiny_model_dir, fitted, tmp_path):
    out = tmp_path / "seg"
    res = invoke("slime", "segment", CAR, "--parts", fitted, "--model", tiny_model_dir, "--out", out, "--preset",
                 "celeba", "--tile-size", "48", "--workers", "0", "--device", "cpu", "--no-progress")
    assert res.exit_code == 0, res.output
    seg = json.loads((out / "run.json").read_text())["fingerprint"]["segment"]
    assert (seg["tiles"], seg["tile_size"]) == (2, 48)


# -- issue 24: evaluate never relabels silently -------------------------------------------
def test_evaluate_classes_come_from_the_run_and_a_mismatch_is_refused(segmented, data):
    one_error(invoke("slime", "evaluate", "--pred", segmented / "masks", "--gt", data, "--classes", "car"),
              "names 6 classes", "3 classes (background,top,bottom")
    res = invoke("slime", "evaluate", "--pred", segmented / "masks", "--gt", data)
    assert res.exit_code == 0, res.output
    assert "top" in res.stdout and "bottom" in res.stdout
    renamed = invoke("slime", "evaluate", "--pred", segmented / "masks", "--gt", data, "--classes", "bg,up,down")
    assert renamed.exit_code == 0 and "renames the classes" in renamed.stderr
