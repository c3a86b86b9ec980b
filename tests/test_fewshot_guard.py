"""The guard rules (issue 21) for `text2mask fewshot`, one test per rule, on the tiny
random DiffewS checkpoint and samples/voc-mini (outputs are MEANINGLESS): inputs are
never written, names from data never escape --out, artefacts are schema-checked on
load, training stops on divergence, masks mean what they look like (and empty supports
are scored as the official code does), and everything is checked before the model
loads. Rule 3 (honest resume, a real SIGKILL) lives in test_fewshot_train.py."""
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fewshot_models import make_fewshot_checkpoint
from text2mask.cli import app
from text2mask.errors import ModelLoadError
from text2mask.fewshot.checkpoint import FEWSHOT_JSON, SUPPORT_CONV, load_diffews, read_info
from text2mask.io import read_index_png
from text2mask.modeling.loading import folder_digest

REPO = Path(__file__).resolve().parent.parent
VOC = REPO / "samples" / "voc-mini" / "VOC2012"
LISTS = REPO / "samples" / "fewshot-mini" / "pascal5i"
pytestmark = pytest.mark.usefixtures("one_thread")
PHOTO = VOC / "JPEGImages" / "2007_000549.jpg"          # a cat, 375 wide, 500 high


@pytest.fixture(scope="module")
def ckpt(tiny_sd2_dir, tmp_path_factory):
    return make_fewshot_checkpoint(tiny_sd2_dir, tmp_path_factory.mktemp("fs") / "ckpt")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    man = tmp_path_factory.mktemp("man") / "episodes.jsonl"
    r = _run("episodes", "--benchmark", "pascal5i", "--fold", 2, "--data-root", VOC, "--lists", LISTS,
             "--count", 2, "--out", man)
    assert r.exit_code == 0, r.output
    return man


def _run(*args):
    return CliRunner().invoke(app, ["fewshot", *map(str, args)])


def _cat_mask(path):
    gt = read_index_png(VOC / "SegmentationClass" / "2007_000549.png")
    Image.fromarray(np.where(gt == 8, 255, 0).astype(np.uint8)).save(path)
    return path


def _edit_manifest(src, dst, header=None, episodes=None):
    lines = [json.loads(x) for x in Path(src).read_text().splitlines()]
    head, eps = lines[0], lines[1:]
    if header:
        header(head["protocol"])
    if episodes:
        eps = episodes(eps)
    Path(dst).write_text("".join(json.dumps(x) + "\n" for x in [head, *eps]))
    return dst


# --- rule 1: inputs are sacred ---------------------------------------------------------

def test_rule1_no_output_is_or_lies_inside_an_input(ckpt, tiny_sd2_dir, manifest, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_sd2_dir, base)
    before = folder_digest(base)
    r = _run("train", "--benchmark", "pascal5i", "--fold", 0, "--data-root", VOC, "--lists", LISTS,
             "--init", base, "--out", base, "--steps", 1, "--device", "cpu")          # --init: the old name
    assert r.exit_code == 2 and "is the --model model" in r.output, r.output
    assert folder_digest(base) == before
    # segment never writes into the folder of its query photo (the mask would be <stem>.png there)
    photos = tmp_path / "photos"
    photos.mkdir()
    query = photos / "q.png"
    Image.open(PHOTO).save(query)
    photo_bytes = query.read_bytes()
    mask = _cat_mask(tmp_path / "cat.png")
    for out in (photos, ckpt / "masks"):
        r = _run("segment", "--support", f"{PHOTO}:{mask}", "--query", query, "--model", ckpt, "--out", out,
                 "--device", "cpu")
        assert r.exit_code == 2 and "inputs are never written" in r.output, r.output
    assert query.read_bytes() == photo_bytes and sorted(p.name for p in photos.iterdir()) == ["q.png"]
    assert not (ckpt / "masks").exists()
    # evaluate never writes inside the data root
    r = _run("evaluate", "--episodes", manifest, "--model", ckpt, "--out", VOC / "run", "--device", "cpu")
    assert r.exit_code == 2 and "lies inside the data root" in r.output, r.output
    assert not (VOC / "run").exists()


# --- rule 2: nothing outside --out ------------------------------------------------------

def test_rule2_names_from_data_never_escape_out(ckpt, manifest, tmp_path):
    bad = _edit_manifest(manifest, tmp_path / "bad.jsonl",
                         episodes=lambda eps: [{**eps[0], "id": "../../x"}, *eps[1:]])
    run = tmp_path / "a" / "b" / "run"
    r = _run("evaluate", "--episodes", bad, "--model", ckpt, "--out", run, "--device", "cpu", "--workers", 0)
    assert r.exit_code == 2 and f"{bad}:2" in r.output and "episode id '../../x'" in r.output, r.output
    assert not run.exists() and not (tmp_path / "a" / "x.png").exists()
    hidden = tmp_path / ".q.jpg"
    shutil.copy(PHOTO, hidden)
    mask = _cat_mask(tmp_path / "cat.png")
    r = _run("segment", "--support", f"{PHOTO}:{mask}", "--query", hidden, "--model", ckpt, "--out",
             tmp_path / "seg", "--device", "cpu")
    assert r.exit_code == 2 and "query file stem '.q'" in r.output, r.output


# --- rule 4: artefacts are validated on load; training stops on divergence ---------------

@pytest.mark.parametrize("field, value, expected", [
    ("threshold", 1.5, "a finite number in [0, 1)"),
    ("threshold", "0.25", "a finite number in [0, 1)"),
    ("threshold", math.nan, "a finite number in [0, 1)"),
    ("resolution", 60, "a positive multiple of 8"),
    ("text_condition", "none", "padded or unpadded"),
    ("fold", 7, "null or 0..3"),
    ("method", "diffusion", "this text2mask reads 'diffews'"),
])
def test_rule4_fewshot_json_fields(ckpt, tmp_path, field, value, expected):
    info = json.loads((ckpt / FEWSHOT_JSON).read_text())
    info[field] = value
    (tmp_path / FEWSHOT_JSON).write_text(json.dumps(info))       # json writes nan as NaN
    with pytest.raises(ModelLoadError, match=rf"{FEWSHOT_JSON}: field '{field}'") as e:
        read_info(tmp_path)
    assert expected in str(e.value)


def test_rule4_bad_checkpoint_and_manifest_exit_2_naming_file_and_field(ckpt, manifest, tmp_path):
    bad_ckpt = tmp_path / "ckpt"
    shutil.copytree(ckpt, bad_ckpt)
    info = json.loads((bad_ckpt / FEWSHOT_JSON).read_text())
    (bad_ckpt / FEWSHOT_JSON).write_text(json.dumps({**info, "threshold": 2}))
    r = _run("evaluate", "--episodes", manifest, "--model", bad_ckpt, "--out", tmp_path / "run", "--device", "cpu")
    assert r.exit_code == 2 and "fewshot.json: field 'threshold'" in r.output and "Traceback" not in r.output
    for edit, field in ((dict(header=lambda p: p.pop("data_root")), "lacks the field 'data_root'"),
                        (dict(header=lambda p: p.update(fold="2")), "field 'fold'"),
                        (dict(episodes=lambda eps: [{**eps[0], "class": 3}, *eps[1:]]), ":2: field 'class'"),
                        (dict(episodes=lambda eps: eps[:1]), "field 'count'")):
        bad = _edit_manifest(manifest, tmp_path / "m.jsonl", **edit)
        r = _run("evaluate", "--episodes", bad, "--model", ckpt, "--out", tmp_path / "run", "--device", "cpu")
        assert r.exit_code == 2 and str(bad) in r.output and field in r.output, r.output
    # a NaN weight is refused on load, naming the file and the parameter
    from safetensors.torch import load_file, save_file

    state = load_file(str(ckpt / SUPPORT_CONV))
    state["bias"][0] = float("nan")
    save_file(state, str(bad_ckpt / SUPPORT_CONV))
    (bad_ckpt / FEWSHOT_JSON).write_text(json.dumps(info))
    with pytest.raises(ModelLoadError, match=r"support_conv_in.safetensors: parameter 'bias' holds NaN"):
        load_diffews(bad_ckpt, device="cpu", dtype="fp32")


def test_rule4_diverged_training_exits_1_and_keeps_only_finite_checkpoints(tiny_sd2_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "train"
    r = _run("train", "--benchmark", "pascal5i", "--fold", 0, "--data-root", VOC, "--lists", LISTS, "--model",
             tiny_sd2_dir, "--out", out, "--steps", 2, "--grad-accum", 1, "--checkpoint-every", 1,
             "--resolution", 64, "--lr", 1e9, "--device", "cpu", "--no-progress")
    assert r.exit_code == 1 and "training diverged at step 2: the loss is nan" in r.output, r.output
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"] and not (out / FEWSHOT_JSON).exists()
    saved = [t for f in (out / "checkpoint-1").glob("*.safetensors") for t in load_file(str(f)).values()]
    assert saved and all(bool(t.isfinite().all()) for t in saved)


def test_rule4_a_non_finite_parameter_after_an_update_stops_training():
    import torch

    from text2mask.errors import TrainingDiverged
    from text2mask.fewshot.train import check_finite

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    check_finite(1, 0.5, net)
    with torch.no_grad():
        net[1].bias[0] = float("inf")
    with pytest.raises(TrainingDiverged, match=r"step 4: parameter 1.bias is not finite"):
        check_finite(4, 0.5, net)


# --- rule 5: masks mean what they look like; empty supports as the official code ---------

def test_rule5_rgba_support_mask_uses_its_alpha(tmp_path):
    from text2mask.fewshot.segment import read_supports

    h, w = 500, 375
    obj = np.zeros((h, w), bool)
    obj[100:200, 150:300] = True
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[~obj] = (255, 255, 255, 0)         # transparent white: composited on white it would be object
    rgba[obj] = (200, 0, 0, 255)            # an opaque red object
    Image.fromarray(rgba, "RGBA").save(tmp_path / "m.png")
    [(_, mask)] = read_supports([(PHOTO, tmp_path / "m.png")])
    assert np.array_equal(mask, obj)


def test_rule5_empty_support_is_scored_as_the_official_code(ckpt, manifest, tmp_path):
    # episode 0001 gets a support without the class (2007_000549 shows a cat, class 8; the
    # episode's class is a fold-2 test class): the official code feeds its all-black mask.
    eps = [json.loads(x) for x in manifest.read_text().splitlines()[1:]]
    assert 8 not in {e["class"] for e in eps}
    bad = _edit_manifest(manifest, tmp_path / "m.jsonl",
                         episodes=lambda eps: [eps[0], {**eps[1], "supports": ["2007_000549"]}])
    run = tmp_path / "run"
    r = _run("evaluate", "--episodes", bad, "--model", ckpt, "--out", run, "--device", "cpu", "--workers", 0,
             "--no-progress")
    assert r.exit_code == 0 and "1 episode(s) have a support mask with no pixel" in r.output, r.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["episodes_with_empty_support"] == 1 and metrics["model"]["episodes"] == 2
    assert json.loads((run / "areas" / "0001.json").read_text())["empty_supports"] == 1
    from text2mask.fewshot.model import episode_inputs
    from text2mask.io import read_image

    m = load_diffews(ckpt, device="cpu", dtype="fp32")
    q = read_image(VOC / "JPEGImages" / f"{eps[1]['query']}.jpg")
    s = read_image(PHOTO)
    black = m.predict([episode_inputs(q, [(s, np.zeros(s.shape[:2], bool))], m.config.resolution)])[0]
    assert np.array_equal(read_index_png(run / "masks" / "0001.png").astype(bool), black.mask(q.shape[:2]))


# --- rule 6: fail before work -----------------------------------------------------------

def test_rule6_options_and_outputs_checked_before_the_model_loads(ckpt, manifest, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    missing = tmp_path / "no-such-base"          # were the model loaded first, this would be the error
    r = _run("evaluate", "--episodes", manifest, "--model", ckpt, "--base-model", missing, "--out", a_file,
             "--device", "cpu")
    assert r.exit_code == 2 and "is an existing file, not a folder" in r.output, r.output
    mask = _cat_mask(tmp_path / "cat.png")
    two = tmp_path / "two"
    two.mkdir()
    shutil.copy(PHOTO, two / "2007_000549.jpg")
    r = _run("segment", "--support", f"{PHOTO}:{mask}", "--query", PHOTO, "--query", two / "2007_000549.jpg",
             "--model", ckpt, "--base-model", missing, "--out", tmp_path / "seg", "--device", "cpu")
    assert r.exit_code == 2 and "share the file name(s) 2007_000549" in r.output, r.output
    train = ["train", "--benchmark", "pascal5i", "--fold", 0, "--data-root", VOC, "--lists", LISTS, "--model",
             missing, "--device", "cpu"]
    for extra, message in ((["--out", a_file], "is an existing file, not a folder"),
                           (["--out", tmp_path / "t", "--lr", "nan"], "--lr must be a finite number > 0"),
                           (["--out", tmp_path / "t", "--lr", "1e40"], "--lr must be a finite number > 0"),
                           (["--out", tmp_path / "t", "--resolution", 12], "resolution 12 must be a positive multiple")):
        r = _run(*train, *extra)
        assert r.exit_code == 2 and message in r.output, r.output
    r = _run("episodes", "--benchmark", "pascal5i", "--fold", 2, "--data-root", VOC, "--lists", LISTS,
             "--out", manifest)
    assert r.exit_code == 2 and "exists; it is never overwritten" in r.output, r.output
    assert not (tmp_path / "seg").exists() and not (tmp_path / "t").exists()


# --- issue 24: the hint, and the offline path -------------------------------------------

def test_a_stable_diffusion_folder_is_not_called_a_released_diffews_folder(tiny_sd2_dir):
    with pytest.raises(ModelLoadError) as e:
        read_info(tiny_sd2_dir)
    assert "released DiffewS" not in str(e.value)
    assert "Stable Diffusion model folder" in str(e.value) and "make_tiny_model.py --family fewshot" in str(e.value)


def test_offline_path_make_tiny_fewshot_then_segment(tmp_path, monkeypatch):
    """The documented offline commands: the script makes a checkpoint, segment runs on it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tiny_model", REPO / "scripts" / "make_tiny_model.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec.loader.exec_module(script)
    script.main([str(tmp_path / "tiny-fewshot"), "--family", "fewshot"])
    assert read_info(tmp_path / "tiny-fewshot")["base_model"] == str((tmp_path / "tiny-fewshot" / "base").resolve())
    voc = "samples/voc-mini/VOC2012"               # the command of docs/fewshot.md, as written there
    monkeypatch.chdir(REPO)
    r = _run("segment", "--model", tmp_path / "tiny-fewshot", "--device", "cpu", "--class", 8, "--support",
             f"{voc}/JPEGImages/2007_000549.jpg:{voc}/SegmentationClass/2007_000549.png",
             "--query", f"{voc}/JPEGImages/2007_001825.jpg", "--out", tmp_path / "masks")
    assert r.exit_code == 0 and "random weights" in r.output, r.output
    assert read_index_png(tmp_path / "masks" / "2007_001825.png").shape == (375, 500)
