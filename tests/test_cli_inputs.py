"""Bad inputs reach the user as one clear message and exit code 2, before any work; and
inputs are never overwritten (issue 10 items 5-8, 10; issue 17 items 2, 5, 6 and the
weaker ones). Real files from samples/, the real CLI; no model is loaded unless said."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from text2mask.cli import app
from text2mask.errors import EXIT_CONFIG, EXIT_FAILED_ITEMS

ROOT = Path(__file__).resolve().parent.parent
VOC = ROOT / "samples" / "voc-mini" / "VOC2012"
COCO = ROOT / "samples" / "coco-mini"
GT = VOC / "SegmentationClass"
IDS = ["2007_000032", "2007_000039", "2007_000063"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error(res, *texts) -> str:
    assert "Traceback" not in res.output, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr
    for t in texts:
        assert t in lines[0], (t, lines[0])
    return lines[0]


# --- labels, prompts and split files ------------------------------------------------

@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in IDS:
        shutil.copy(VOC / "JPEGImages" / f"{i}.jpg", folder)
    return folder


def generate(*args):
    """`generate` as far as its dataset checks: the model path does not exist, so a run
    that got past the data would fail on the model instead (and say so)."""
    return invoke("generate", *args, "--model", "/no/such/model", "--device", "cpu", "--workers", "0")


@pytest.mark.parametrize("value", [5, None, {"a": 1}])
def test_labels_json_value_that_is_not_a_list(value, photos, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"2007_000032.jpg": ["aeroplane"], "2007_000039.jpg": value}))
    res = generate("--dataset", "folder", "--images", photos, "--labels", labels, "--prompts", "voc",
                   "--out", tmp_path / "out")
    assert res.exit_code == EXIT_CONFIG
    one_error(res, str(labels), "'2007_000039.jpg'", "must be a list", json.dumps(value))


@pytest.mark.parametrize("content, held", [
    (np.array(7), "0-d int64 array"),
    (np.array(["2007_000032", "aeroplane"]), "1-d <U11 array"),
    (np.array({"2007_000032": "aeroplane"}, dtype=object), "<U9 values"),
])
def test_npy_labels_that_are_not_a_multi_hot_dict(content, held, tmp_path, make_voc_tree):
    root = make_voc_tree(tmp_path / "VOC2012", IDS[:1])
    npy = tmp_path / "cls_labels.npy"
    np.save(npy, content, allow_pickle=True)
    res = generate("--data-root", root, "--labels-from", "file", "--labels", npy, "--out", tmp_path / "out")
    assert res.exit_code == EXIT_CONFIG
    one_error(res, str(npy), held)


@pytest.mark.parametrize("doc, text", [([], "a JSON array"), ("voc", "a JSON string"),
                                       ({"name": "x"}, "without a 'classes' list"),
                                       ({"classes": [{"prompt": "dog"}]}, "class 1 must be an object")])
def test_prompts_file_that_is_not_a_class_set(doc, text, tmp_path):
    prompts = tmp_path / "classes.json"
    prompts.write_text(json.dumps(doc))
    res = invoke("evaluate", "--pred", GT, "--gt", GT, "--prompts", prompts)
    assert res.exit_code == EXIT_CONFIG
    one_error(res, str(prompts), text)


@pytest.mark.parametrize("key, value, text", [
    ("box_threshold", float("nan"), "box threshold nan must lie in [0, 1)"),
    ("box_threshold", -0.2, "box threshold -0.2 must lie in [0, 1)"),
    ("background_tau", -1.0, "background tau -1.0 must be positive"),
    ("background_tau", float("inf"), "background tau inf must be positive"),
    ("background_power", 0, "background power p 0.0 must be positive"),
    ("background_power", "2", "background_power must be a number"),
])
def test_nonsense_method_parameters_in_a_prompts_file(key, value, text, photos, tmp_path):
    doc = json.loads((ROOT / "prompts" / "voc.json").read_text())
    doc[key] = value
    prompts = tmp_path / "classes.json"
    prompts.write_text(json.dumps(doc))  # NaN and Infinity as Python's json writes them
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"2007_000032.jpg": ["aeroplane"]}))
    res = generate("--dataset", "folder", "--images", photos, "--labels", labels, "--prompts", prompts,
                   "--out", tmp_path / "out")
    assert res.exit_code == EXIT_CONFIG
    one_error(res, str(prompts), text)


def test_more_than_254_classes_are_refused_before_the_model(tmp_path):
    phrases = ",".join(f"thing{i}" for i in range(255))
    res = invoke("segment", VOC / "JPEGImages" / f"{IDS[0]}.jpg", "--labels", phrases,
                 "--model", "/no/such/model", "--device", "cpu", "--out", tmp_path / "out")
    assert res.exit_code == EXIT_CONFIG
    one_error(res, "255 classes; at most 254 fit in an 8-bit index mask")


def test_split_file_with_a_byte_order_mark(tmp_path):
    split = tmp_path / "split.txt"
    split.write_bytes("\ufeff2007_000032\n2007_000039\n".encode("utf-8"))
    res = invoke("evaluate", "--pred", GT, "--gt", GT, "--split-file", split)
    assert res.exit_code == 0, res.output
    assert "images: 2" in res.stdout


def test_num_classes_below_one(tmp_path):
    res = invoke("evaluate", "--pred", GT, "--gt", GT, "--num-classes", "0")
    assert res.exit_code == EXIT_CONFIG and "--num-classes" in res.output


# --- evaluate: --json, missing predictions, --strict ----------------------------------

@pytest.fixture
def two_predictions(tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    for i in IDS[:2]:
        shutil.copy(GT / f"{i}.png", pred)
    return pred


def test_json_pointing_at_a_folder_or_at_the_chart(two_predictions, tmp_path):
    folder = tmp_path / "metrics"
    folder.mkdir()
    res = invoke("evaluate", "--pred", two_predictions, "--gt", GT, "--json", folder)
    assert res.exit_code == EXIT_CONFIG
    one_error(res, str(folder), "is a folder")
    png = tmp_path / "m.png"
    res = invoke("evaluate", "--pred", two_predictions, "--gt", GT, "--json", png)
    assert res.exit_code == EXIT_CONFIG
    one_error(res, str(png), "must end in .json")
    assert not png.exists()


def test_json_holds_the_mmseg_keys_and_the_confusion_matrix(two_predictions, tmp_path):
    out = tmp_path / "m.json"
    res = invoke("evaluate", "--pred", two_predictions, "--gt", GT, "--json", out)
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    # The predictions are the GT itself: every present class perfect.
    assert doc["mIoU"] == doc["mAcc"] == doc["aAcc"] == 100.0
    conf = np.array(doc["confusion"])
    assert conf.shape == (21, 22)
    gts = [np.asarray(Image.open(GT / f"{i}.png")) for i in IDS[:2]]
    counts = np.bincount(np.concatenate([g[g != 255] for g in gts]), minlength=21)
    np.testing.assert_array_equal(np.diag(conf[:, :21]), counts)
    assert conf.sum() == counts.sum()
    assert [c["Acc"] is None for c in doc["per_class"]] == [n == 0 for n in counts]
    with Image.open(out.with_suffix(".png")) as im:
        assert im.mode == "RGB"


def test_ground_truth_without_prediction_is_counted_and_strict_fails(two_predictions, tmp_path):
    res = invoke("evaluate", "--pred", two_predictions, "--gt", GT)
    assert res.exit_code == 0
    n_gt = len(list(GT.glob("*.png")))
    assert f"ground-truth images without a prediction (not scored): {n_gt - 2}" in res.stdout
    assert f"warning: {n_gt - 2} ground-truth image(s)" in res.stderr
    res = invoke("evaluate", "--pred", two_predictions, "--gt", GT, "--strict")
    assert res.exit_code == EXIT_CONFIG
    one_error(res, str(GT), f"{n_gt - 2} ground-truth image(s) have no prediction", "--strict")
    gt_two = two_predictions.parent / "gt"
    shutil.copytree(two_predictions, gt_two)
    assert invoke("evaluate", "--pred", two_predictions, "--gt", gt_two, "--strict").exit_code == 0


# --- COCO annotation files ------------------------------------------------------------

def _coco_root(tmp_path, edit) -> Path:
    root = tmp_path / "coco"
    shutil.copytree(COCO / "images", root / "train2014")
    doc = json.loads((COCO / "annotations" / "instances_mini.json").read_text())
    edit(doc)
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train2014.json").write_text(json.dumps(doc))
    return root


def _first_polygon(doc):
    return next(a for a in doc["annotations"] if isinstance(a["segmentation"], list))


COCO_CASES = {
    "category without name": (lambda d: d["categories"][0].pop("name"), ["category", "'name' string"]),
    "annotation without segmentation": (lambda d: _first_polygon(d).pop("segmentation"), ["no 'segmentation'"]),
    "image without height": (lambda d: d["images"][0].pop("height"), ["height=None"]),
    "negative height": (lambda d: d["images"][0].update(height=-5), ["height=-5"]),
    "3-number polygon": (lambda d: _first_polygon(d).update(segmentation=[[1.0, 2.0, 3.0]]),
                         ["at least 3 points, got 3 number(s)"]),
    "bad compressed RLE": (lambda d: _first_polygon(d).update(
        segmentation={"size": [d["images"][0]["height"], d["images"][0]["width"]], "counts": "!!!"}),
        ["not a valid compressed COCO RLE string"]),
    "RLE runs of the wrong total": (lambda d: _first_polygon(d).update(
        segmentation={"size": [d["images"][0]["height"], d["images"][0]["width"]], "counts": [5, 5]}),
        ["RLE runs cover 10 pixels"]),
}


@pytest.mark.parametrize("case", list(COCO_CASES))
def test_defective_coco_annotations(case, tmp_path):
    edit, texts = COCO_CASES[case]
    if "RLE" in case:  # the polygon edited must belong to the first image (whose size the RLE copies)
        def edit(doc, _edit=edit):
            first = doc["images"][0]["id"]
            target = next(a for a in doc["annotations"] if a["image_id"] == first and isinstance(a["segmentation"], list))
            doc["annotations"].remove(target)
            doc["annotations"].insert(0, target)
            _edit(doc)
    root = _coco_root(tmp_path, edit)
    res = invoke("coco-gt", "--data-root", root, "--out", tmp_path / "gt")
    assert res.exit_code == EXIT_CONFIG, res.output
    one_error(res, str(root / "annotations" / "instances_train2014.json"), *texts)
    assert not (tmp_path / "gt").exists() or not any((tmp_path / "gt").iterdir())


def test_valid_coco_annotations_still_render(tmp_path):
    root = _coco_root(tmp_path, lambda d: None)
    res = invoke("coco-gt", "--data-root", root, "--out", tmp_path / "gt")
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "gt").glob("*.png"))) == 4


# --- VOC: class order, per-image ground truth, conflicting options ---------------------

def test_reordered_voc_class_file_with_labels_from_masks(tmp_path, make_voc_tree):
    root = make_voc_tree(tmp_path / "VOC2012", IDS)
    doc = json.loads((ROOT / "prompts" / "voc.json").read_text())
    person = next(c for c in doc["classes"] if c["name"] == "person")
    doc["classes"].remove(person)
    doc["classes"].insert(0, person)
    prompts = tmp_path / "reordered.json"
    prompts.write_text(json.dumps(doc))
    res = generate("--data-root", root, "--prompts", prompts, "--out", tmp_path / "out")
    assert res.exit_code == EXIT_CONFIG
    one_error(res, str(prompts), "class 1 is 'person'", "index 1 for 'aeroplane'")
    # By XML (names), the same file is fine for labels, but VOC's GT cannot score it.
    from text2mask.data.voc import load_voc

    (root / "Annotations").mkdir()
    ds = load_voc(root, "train", "xml", class_set=prompts)
    assert ds.gt_dir is None and all(s.gt is None for s in ds.samples)
    assert any("ground truth not used for evaluation" in n for n in ds.notes)


def test_ground_truth_is_found_per_image(tmp_path, make_voc_tree):
    from text2mask.data.voc import load_voc

    root = make_voc_tree(tmp_path / "VOC2012", IDS)
    aug = root / "SegmentationClassAug"
    aug.mkdir()
    shutil.copy(GT / f"{IDS[1]}.png", aug)        # a partly filled Aug folder
    ds = load_voc(root, "train")
    assert [s.gt for s in ds.samples] == [root / "SegmentationClass" / f"{IDS[0]}.png", aug / f"{IDS[1]}.png",
                                          root / "SegmentationClass" / f"{IDS[2]}.png"]
    assert ds.gt_dirs == [root / "SegmentationClass", aug]
    # Labels from the masks come from each image's own file.
    for s in ds.samples:
        expected = sorted(set(np.unique(np.asarray(Image.open(GT / f"{s.id}.png"))).tolist()) - {0, 255})
        assert list(ds.labels(s)) == expected


@pytest.mark.parametrize("source", ["mask", "xml"])
def test_labels_file_with_labels_from_mask_or_xml_is_refused(source, tmp_path, make_voc_tree):
    root = make_voc_tree(tmp_path / "VOC2012", IDS[:1])
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({IDS[0]: ["aeroplane"]}))
    res = generate("--data-root", root, "--labels-from", source, "--labels", labels, "--out", tmp_path / "out")
    assert res.exit_code == EXIT_CONFIG
    one_error(res, f"--labels {labels} and --labels-from {source} contradict each other")


# --- segment: outputs never replace inputs; phrases not repeated as background ----------

def test_segment_refuses_to_overwrite_a_photo_or_write_into_a_file(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    png = folder / "cat.png"
    Image.open(VOC / "JPEGImages" / f"{IDS[2]}.jpg").save(png)
    before = png.read_bytes()
    res = invoke("segment", png, "--labels", "cat", "--out", folder,
                 "--model", "/no/such/model", "--device", "cpu")
    assert res.exit_code == EXIT_CONFIG
    one_error(res, f"--out {folder} is the folder of the photo {png}", "inputs are never written")
    assert png.read_bytes() == before
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    res = invoke("segment", png, "--labels", "cat", "--out", a_file, "--model", "/no/such/model", "--device", "cpu")
    assert res.exit_code == EXIT_CONFIG
    one_error(res, f"--out {a_file} is an existing file")
    assert a_file.read_text() == "mine\n"


def test_segment_does_not_repeat_a_phrase_as_background(tokenizer):
    from text2mask.cli.wsss import _phrase_class_set
    from text2mask.wsss.prompts import plan_prompts

    cs = _phrase_class_set("tree, dog")
    text = plan_prompts(tokenizer, cs, [1, 2]).prompts[0].text
    assert text == ("a photo including tree, dog, river, sea, lake, water, railway, railroad, track, "
                    "stone, and rocks.")
    assert text.count("tree") == 1


def test_segment_phrase_longer_than_77_tokens_is_refused_before_any_photo(tiny_model_dir, tmp_path):
    long_phrase = " ".join(["dog"] * 80)
    res = invoke("segment", VOC / "JPEGImages" / f"{IDS[0]}.jpg", "--labels", long_phrase,
                 "--model", tiny_model_dir, "--device", "cpu", "--out", tmp_path / "out")
    assert res.exit_code == EXIT_CONFIG
    one_error(res, "--labels", "does not fit in 77 tokens")
    assert not (tmp_path / "out").exists()


# --- visualize: a run folder made of real files -----------------------------------------

@pytest.fixture
def run_folder(tmp_path):
    """A generate-style run folder over three VOC photos (the GT stands in for the masks),
    with run.json paths relative to the run folder."""
    photos, gt, run = tmp_path / "photos", tmp_path / "gt", tmp_path / "runs" / "r"
    photos.mkdir(), gt.mkdir()
    for i in IDS:
        shutil.copy(VOC / "JPEGImages" / f"{i}.jpg", photos)
        shutil.copy(GT / f"{i}.png", gt)
        for folder in ("masks", "initial", "crf"):
            (run / folder).mkdir(parents=True, exist_ok=True)
            a = np.asarray(Image.open(GT / f"{i}.png"))
            Image.fromarray(np.where(a == 255, 0, a) if folder != "masks" else a).save(run / folder / f"{i}.png")
    names = json.loads((ROOT / "prompts" / "voc.json").read_text())["classes"]
    (run / "run.json").write_text(json.dumps({
        "fingerprint": {"class_set": {"classes": [{"name": c["name"]} for c in names]},
                        "method": {"confidence": 0.95}},
        "dataset": {"image_dir": "../../photos", "gt_dir": "../../gt"}}))
    return run


def strip_width(path: Path) -> int:
    with Image.open(path) as im:
        return im.size[0]


def test_visualize_resolves_run_json_paths_from_the_run_folder(run_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)   # somewhere else entirely
    res = invoke("visualize", "--run", run_folder)
    assert res.exit_code == 0, res.output
    w = np.asarray(Image.open(VOC / "JPEGImages" / f"{IDS[0]}.jpg")).shape[1]
    assert strip_width(run_folder / "vis" / f"{IDS[0]}.png") == 5 * w   # the GT column is there


def test_visualize_gt_option_and_a_lost_gt_folder_is_said(run_folder, tmp_path):
    shutil.move(tmp_path / "gt", tmp_path / "gt-moved")
    res = invoke("visualize", "--run", run_folder, "--out", tmp_path / "v1")
    assert res.exit_code == 0
    assert "warning: ground-truth folder" in res.stderr and "--gt" in res.stderr
    w = np.asarray(Image.open(VOC / "JPEGImages" / f"{IDS[0]}.jpg")).shape[1]
    assert strip_width(tmp_path / "v1" / f"{IDS[0]}.png") == 4 * w
    res = invoke("visualize", "--run", run_folder, "--out", tmp_path / "v2", "--gt", tmp_path / "gt-moved")
    assert res.exit_code == 0 and "warning" not in res.stderr
    assert strip_width(tmp_path / "v2" / f"{IDS[0]}.png") == 5 * w


def test_visualize_skips_a_missing_photo_and_still_writes_the_page(run_folder, tmp_path):
    (tmp_path / "photos" / f"{IDS[1]}.jpg").unlink()
    res = invoke("visualize", "--run", run_folder)
    assert res.exit_code == EXIT_FAILED_ITEMS
    assert f"warning: {IDS[1]}: skipped" in res.stderr
    page = (run_folder / "vis" / "index.html").read_text()
    assert f'src="{IDS[0]}.png"' in page and f'src="{IDS[2]}.png"' in page
    assert f'src="{IDS[1]}.png"' not in page and "Skipped" in page and IDS[1] in page
    assert sorted(p.stem for p in (run_folder / "vis").glob("*.png")) == [IDS[0], IDS[2]]


def test_visualize_never_overwrites_its_inputs(run_folder, tmp_path):
    before = {p: p.read_bytes() for p in (run_folder / "masks").iterdir()}
    res = invoke("visualize", "--run", run_folder, "--out", run_folder / "masks")
    assert res.exit_code == EXIT_CONFIG
    one_error(res, f"--out {run_folder / 'masks'} is the run's masks/ folder", "inputs are never written")
    assert {p: p.read_bytes() for p in (run_folder / "masks").iterdir()} == before
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    res = invoke("visualize", "--run", run_folder, "--out", a_file)
    assert res.exit_code == EXIT_CONFIG
    one_error(res, "is an existing file")


@pytest.mark.parametrize("doc, text", [
    ([1, 2], "expected a JSON object"),
    ({"dataset": 5}, "field dataset should be an object"),
    ({"dataset": {"image_dir": 7}}, "field dataset.image_dir should be a string"),
    ({"fingerprint": {"class_set": {"classes": "voc"}}}, "field fingerprint.class_set.classes should be a list"),
    ({"fingerprint": {"method": {"confidence": "high"}}}, "fingerprint.method.confidence should be a number"),
])
def test_visualize_malformed_run_json(doc, text, run_folder):
    (run_folder / "run.json").write_text(json.dumps(doc))
    res = invoke("visualize", "--run", run_folder)
    assert res.exit_code == EXIT_CONFIG
    one_error(res, str(run_folder / "run.json"), text)


# --- the guard on the WSSS commands (issue 21, rule 1 and 6) -------------------------------

def test_evaluate_json_never_replaces_a_ground_truth_or_prediction(two_predictions, tmp_path, make_voc_tree):
    root = make_voc_tree(tmp_path / "VOC2012", IDS[:2])
    gt = root / "SegmentationClass"
    before = {p: p.read_bytes() for p in [*gt.iterdir(), *two_predictions.iterdir()]}
    for target, what in ((gt / "m.json", "lies inside the ground-truth folder"),
                         (two_predictions / "m.json", "lies inside the prediction folder")):
        res = invoke("evaluate", "--pred", two_predictions, "--gt", gt, "--json", target)
        assert res.exit_code == EXIT_CONFIG
        one_error(res, f"--json {target}", what)
        assert not target.exists()
    # the chart beside the .json would be a PNG named like a ground-truth mask
    res = invoke("evaluate", "--pred", two_predictions, "--gt", gt, "--json", gt / f"{IDS[0]}.json")
    assert res.exit_code == EXIT_CONFIG
    assert {p: p.read_bytes() for p in [*gt.iterdir(), *two_predictions.iterdir()]} == before
    res = invoke("evaluate", "--pred", two_predictions, "--gt", gt, "--json", tmp_path / "r" / "m.json")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r" / "m.json").read_text())["mIoU"] == 100.0


@pytest.mark.parametrize("where", ["JPEGImages", "JPEGImages/pseudo", "SegmentationClass", "."])
def test_generate_refuses_an_out_that_is_or_holds_or_lies_in_the_data(where, tmp_path, make_voc_tree):
    root = make_voc_tree(tmp_path / "VOC2012", IDS[:2])
    listing = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    out = root / where
    res = invoke("generate", "--data-root", root, "--out", out, "--model", "/no/such/model", "--device", "cpu")
    assert res.exit_code == EXIT_CONFIG
    one_error(res, "inputs are never written")
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == listing   # nothing created


def test_generate_accepts_a_new_folder_beside_the_data_and_fails_on_the_model(tmp_path, make_voc_tree):
    """--out VOC2012/pseudo is neither an input folder nor holds one: the guard passes, the
    bad model is the next error (so the guard ran before the model and did not create --out)."""
    root = make_voc_tree(tmp_path / "VOC2012", IDS[:2])
    res = invoke("generate", "--data-root", root, "--out", root / "pseudo", "--model", tmp_path / "nope",
                 "--device", "cpu")
    assert res.exit_code == EXIT_CONFIG
    line = one_error(res)
    assert "inputs are never written" not in line and "nope" in line
