"""`personalize` and `refer` against hostile arguments (issue 21, rules 1, 2 and 6): inputs
are never written, names from data never leave --out, and every refusal comes before the
model loads (most cases pass a --model that does not exist: reaching the loader would
print a model error instead), with exit 2 and one line."""
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from test_refer_concept import random_concept_tensors, write_format
from text2mask.cli import app

SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "refer-mini"
NO_MODEL = ["--model", "/nonexistent/model-folder", "--device", "cpu"]


def _run(args):
    return CliRunner().invoke(app, [*map(str, args)])


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(SAMPLE / "concepts" / "cat-left", folder)
    return folder


def _refused(res, *words):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "model-folder" not in res.output, res.output
    for w in words:
        assert w in res.output, (w, res.output)


def test_personalize_never_writes_its_photos(photos, tmp_path):
    before = _tree(photos)
    _refused(_run(["personalize", photos, "--class", "cat", "--out", photos, *NO_MODEL]), "is the photo")
    _refused(_run(["personalize", photos / "view1.jpg", "--class", "cat", "--out", photos, *NO_MODEL]),
             "is the folder of the photo")
    _refused(_run(["personalize", photos, "--class", "cat", "--out", photos / "concept", *NO_MODEL]), "lies inside")
    _refused(_run(["personalize", photos, "--class", "cat", "--out", tmp_path, *NO_MODEL]), "contains the photo")
    # --class-images that are the photos themselves, when the run would draw into them
    _refused(_run(["personalize", photos, "--class", "cat", "--out", tmp_path / "c", "--class-images", photos,
                   "--generate-class-images", "2", *NO_MODEL]), "--class-images")
    assert _tree(photos) == before


def test_personalize_out_holding_other_files_is_refused(photos, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    _refused(_run(["personalize", photos, "--class", "cat", "--out", home, *NO_MODEL]), "not a concept")
    assert (home / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("args,words", [
    (["--token", "../../x"], ["concept token", "cannot be a file name"]),
    (["--token", ".hidden"], ["starts with a dot"]),
    (["--token", "two words"], ["--token"]),
    (["--base-lr", "0"], ["--base-lr"]),
    (["--base-lr", "nan"], ["--base-lr"]),
    (["--size", "100"], ["--size 100", "multiple of 8"]),
    (["--mixed-precision", "fp8"], ["--mixed-precision"]),
    (["--freeze", "all"], ["--freeze"]),
    (["--device", "tpu"], ["--device"]),
])
def test_personalize_options_are_checked_before_the_model(photos, tmp_path, args, words):
    _refused(_run(["personalize", photos, "--class", "cat", "--out", tmp_path / "c", *NO_MODEL, *args]), *words)
    assert not list(tmp_path.glob("c/*")) and not (tmp_path / "x").exists()


def test_personalize_unwritable_out_and_bad_photos(photos, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file")
    _refused(_run(["personalize", photos, "--class", "cat", "--out", blocker / "c", *NO_MODEL]), "in the way")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"not a jpeg")
    _refused(_run(["personalize", bad, "--class", "cat", "--out", tmp_path / "c", *NO_MODEL]), "broken.jpg")


def _dataset(tmp_path, edit):
    root = tmp_path / "data"
    shutil.copytree(SAMPLE, root)
    doc = json.loads((root / "dataset.json").read_text())
    edit(doc)
    (root / "dataset.json").write_text(json.dumps(doc))
    return root


def test_data_root_names_never_escape(tmp_path):
    def bad_concept(doc):
        doc["concepts"]["../../x"] = {"class": "cat"}

    def bad_triplet(doc):
        doc["triplets"][0]["id"] = "../../x"

    for edit, what in ((bad_concept, "concept id"), (bad_triplet, "triplet id")):
        root = _dataset(tmp_path / what.replace(" ", "-"), edit)
        _refused(_run(["personalize", "--data-root", root, "--out", tmp_path / "trained", *NO_MODEL]), what,
                 "cannot be a file name")
        _refused(_run(["refer", "--data-root", root, "--concepts", tmp_path, "--out", tmp_path / "run", *NO_MODEL]),
                 what)
    assert not (tmp_path.parent / "x").exists()
    root = _dataset(tmp_path / "ok", lambda d: None)
    _refused(_run(["personalize", "--data-root", root, "--out", root / "trained", *NO_MODEL]), "lies inside")
    _refused(_run(["refer", "--data-root", root, "--concepts", tmp_path, "--out", root, *NO_MODEL]), "--data-root")


@pytest.fixture(scope="module")
def concept(sd, tmp_path_factory):
    attn2, embed = random_concept_tensors(sd.unet, seed=3)
    return write_format(tmp_path_factory.mktemp("concept") / "cat-left", "A", attn2, embed)


def test_refer_never_writes_its_photo_or_concepts(concept, tmp_path):
    scene = tmp_path / "scene"
    scene.mkdir()
    photo = scene / "cats.jpg"
    shutil.copy(SAMPLE / "images" / "COCO_val2014_000000039769.jpg", photo)
    before, concept_before = photo.read_bytes(), _tree(concept)
    base = ["refer", photo, "--class", "cat", "--concept", concept, "--text", "the cat on the left", *NO_MODEL]
    _refused(_run([*base, "--out", scene]), "is the folder of the photo")
    _refused(_run([*base, "--out", concept]), "--concept")
    _refused(_run([*base, "--out", concept / "seg"]), "lies inside")
    hidden = scene / ".cats.jpg"
    shutil.copy(photo, hidden)
    _refused(_run([*base[:1], hidden, *base[2:], "--out", tmp_path / "seg"]), "photo name", "starts with a dot")
    assert photo.read_bytes() == before and _tree(concept) == concept_before


def test_refer_checks_concepts_and_options_before_the_model(concept, tmp_path):
    photo = SAMPLE / "images" / "COCO_val2014_000000039769.jpg"
    base = ["refer", photo, "--class", "cat", "--text", "the cat on the left", "--out", tmp_path / "seg", *NO_MODEL]
    nan = tmp_path / "nan"
    shutil.copytree(concept, nan)
    from safetensors.torch import load_file, save_file

    weights = nan / "pytorch_custom_diffusion_weights.safetensors"
    t = load_file(str(weights))
    key = sorted(t)[0]
    t[key][0, 0] = float("inf")
    save_file(t, str(weights))
    _refused(_run([*base, "--concept", nan]), str(weights), key, "non-finite")
    _refused(_run([*base, "--concept", concept, "--af-group", "scene"]), "--af-group")
    _refused(_run([*base, "--concept", concept, "--box-threshold", "1.5"]), "box-threshold")
