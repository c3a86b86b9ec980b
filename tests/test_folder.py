"""The user's-own-images source, on real VOC photos copied from samples/voc-mini."""
import json
import shutil
from pathlib import Path

import pytest

from text2mask.errors import DatasetError
from text2mask.data.folder import load_folder

JPEGS = Path(__file__).resolve().parent.parent / "samples" / "voc-mini" / "VOC2012" / "JPEGImages"
VOC = Path(__file__).resolve().parent.parent / "prompts" / "voc.json"

# A user class set in the prompts/voc.json format, with a class VOC does not have.
CLASSES = {
    "name": "mine",
    "box_threshold": 0.3,
    "default_background": ["tree", "sky"],
    "classes": [
        {"name": "aeroplane", "prompt": "aeroplane airplane"},
        {"name": "person", "prompt": "person with clothes"},
        {"name": "kite", "prompt": "kite paraglider", "background": ["sky", "cloud"]},
        {"name": "dog", "prompt": "dog"},
        {"name": "chair", "prompt": "chair seat"},
        {"name": "cat", "prompt": "cat"},
    ],
}
AEROPLANE, PERSON, KITE, DOG, CHAIR, CAT = range(1, 7)


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in ("2007_000032", "2007_000063", "2007_000549", "2007_000068"):
        shutil.copy(JPEGS / f"{i}.jpg", folder / f"{i}.jpg")
    (folder / "readme.txt").write_text("not an image")
    return folder


@pytest.fixture
def classes(tmp_path):
    path = tmp_path / "classes.json"
    path.write_text(json.dumps(CLASSES))
    return path


def test_json_labels(photos, classes, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({
        "2007_000032.jpg": ["aeroplane", "person", "kite"],
        "2007_000063": "dog; chair",
        "2007_000549.jpg": ["Cat"],
    }))
    ds = load_folder(photos, labels, classes)
    assert ds.name == "folder" and ds.class_set.name == "mine"
    assert ds.class_set.spec(KITE).prompt == "kite paraglider"
    assert [(s.id, s.classes) for s in ds.samples] == [
        ("2007_000032", (AEROPLANE, PERSON, KITE)),
        ("2007_000063", (DOG, CHAIR)),
        ("2007_000549", (CAT,)),
    ]
    assert all(s.image == photos / f"{s.id}.jpg" and s.gt is None for s in ds.samples)
    assert ds.gt_dir is None
    assert len(ds.notes) == 1 and "1 image(s)" in ds.notes[0] and "2007_000068.jpg" in ds.notes[0]


@pytest.mark.parametrize("text", [
    "File Name,labels\n2007_000032.jpg,aeroplane;person\n2007_000063,dog;chair\n2007_000549.jpg,cat\n",
    '2007_000032.jpg,"aeroplane,person"\n\n2007_000063.jpg,"dog, chair"\n2007_000549,cat\n',
    "2007_000032.jpg,aeroplane,person\n2007_000063.jpg,dog,chair\n2007_000549.jpg,cat,\n",
    "\ufeffimage;labels\n2007_000032.jpg;aeroplane,person\n2007_000063.jpg;dog;chair\n2007_000549.jpg;cat\n",
    "image\tlabels\n2007_000032.jpg\taeroplane;person\n2007_000063.jpg\tdog;chair\n2007_000549.jpg\tcat\n",
], ids=["semicolon-cell", "quoted-commas", "one-per-column", "semicolon-separated-bom", "tab"])
def test_csv_labels(photos, classes, tmp_path, text):
    labels = tmp_path / "labels.csv"
    labels.write_text(text, encoding="utf-8")
    ds = load_folder(photos, labels, classes)
    assert [(s.id, s.classes) for s in ds.samples] == [
        ("2007_000032", (AEROPLANE, PERSON)),
        ("2007_000063", (DOG, CHAIR)),
        ("2007_000549", (CAT,)),
    ]


def test_empty_labels_and_missing_image(photos, classes, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("2007_000068.jpg,\nlost.jpg,kite\nC:\\data\\2007_000549.jpg,cat\n")
    ds = load_folder(photos, labels, classes)
    assert [(s.id, s.classes) for s in ds.samples] == [
        ("2007_000068", ()), ("lost", (KITE,)), ("2007_000549", (CAT,))]
    # The missing photo stays: it fails on its own when the runner reaches it.
    assert ds.samples[1].image == photos / "lost.jpg" and not ds.samples[1].image.exists()
    assert any("1 listed image(s) are not in" in n and "lost.jpg" in n for n in ds.notes)
    assert any("2 image(s)" in n and "left out" in n for n in ds.notes)


def test_voc_class_set_by_name(photos, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"2007_000063.jpg": ["dog", "chair"]}))
    ds = load_folder(photos, labels, "voc")
    assert ds.samples[0].classes == (9, 12)


def test_unknown_class_names_image_and_class(photos, classes, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"2007_000032.jpg": ["aeroplane"], "2007_000063.jpg": ["dog", "sofa"]}))
    with pytest.raises(DatasetError, match=r"image '2007_000063\.jpg'.*unknown class name 'sofa'"):
        load_folder(photos, labels, classes)
    csv = tmp_path / "labels.csv"
    csv.write_text("file,labels\n2007_000032.jpg,aeroplane\n2007_000063.jpg,kite;sofa\n")
    with pytest.raises(DatasetError, match=r"line 3: image '2007_000063\.jpg'.*unknown class name 'sofa'"):
        load_folder(photos, csv, classes)
    # 'kite' is no VOC class: the same file with the VOC set fails on it.
    with pytest.raises(DatasetError, match=r"unknown class name 'kite' \(class set 'voc'\)"):
        load_folder(photos, csv, VOC)


def test_duplicate_stems(photos, classes, tmp_path):
    shutil.copy(JPEGS / "2007_000129.jpg", photos / "2007_000032.png")
    labels = tmp_path / "labels.csv"
    labels.write_text("2007_000032.jpg,person\n2007_000032.png,person\n")
    with pytest.raises(DatasetError, match="same stem '2007_000032'"):
        load_folder(photos, labels, classes)
    labels.write_text("2007_000032,person\n")
    with pytest.raises(DatasetError, match="2007_000032.jpg and 2007_000032.png .* share that stem"):
        load_folder(photos, labels, classes)
    # Named in full, one of the two is unambiguous.
    labels.write_text("2007_000032.png,person\n")
    assert load_folder(photos, labels, classes).samples[0].image == photos / "2007_000032.png"
    labels.write_text("2007_000063.jpg,dog\n2007_000063.jpg,chair\n")
    with pytest.raises(DatasetError, match="listed twice"):
        load_folder(photos, labels, classes)


def test_configuration_errors(photos, classes, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text("{}")
    with pytest.raises(DatasetError, match="lists no images"):
        load_folder(photos, labels, classes)
    with pytest.raises(DatasetError, match="image folder .*nowhere does not exist"):
        load_folder(tmp_path / "nowhere", labels, classes)
    with pytest.raises(DatasetError, match=r"missing\.csv: labels file not found"):
        load_folder(photos, tmp_path / "missing.csv", classes)
    with pytest.raises(DatasetError, match=r"nope\.json: class/prompt file not found"):
        load_folder(photos, labels, tmp_path / "nope.json")
