"""VOC sources: split lists, and image-level labels from masks, XML and label files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from text2mask.cli import app
from text2mask.errors import DatasetError
from text2mask.data.voc import load_voc
from text2mask.io import read_index_png

VOC = Path(__file__).resolve().parent.parent / "samples" / "voc-mini" / "VOC2012"
NAMES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
         "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


def _gt_labels(i: str) -> tuple[int, ...]:
    values = set(np.unique(read_index_png(VOC / "SegmentationClass" / f"{i}.png")).tolist())
    return tuple(sorted(values - {0, 255}))


@pytest.fixture
def tree(tmp_path):
    """VOC2012 with JPEGImages only and a split list: label sources are added per test."""
    root = tmp_path / "VOC2012"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "JPEGImages").symlink_to(VOC / "JPEGImages")
    ids = ["2007_000032", "2007_000392", "2007_006241"]
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    return root, ids


def _write_xml(path: Path, names: list[str]) -> None:
    objects = "".join(f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated>"
                      f"<difficult>0</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax>"
                      f"<ymax>9</ymax></bndbox></object>" for n in names)
    path.write_text(f"<annotation><folder>VOC2012</folder><filename>{path.stem}.jpg</filename>"
                    f"<size><width>500</width><height>375</height><depth>3</depth></size>{objects}</annotation>")


def test_labels_from_the_ground_truth_masks_equal_the_classes_present():
    ds = load_voc(VOC, "train")
    assert ds.label_source.startswith("ground-truth masks")
    assert len(ds) == 19
    for s in ds.samples:
        assert ds.labels(s) == _gt_labels(s.id)
    assert ds.labels(ds.samples[0]) == (1, 15)  # 2007_000032: aeroplane, person


def test_labels_from_xml_annotations(tree):
    root, ids = tree
    (root / "Annotations").mkdir()
    for i in ids:  # every object's class, repeated objects once (as the VOC XML format lists them)
        names = [NAMES[k] for k in _gt_labels(i)]
        _write_xml(root / "Annotations" / f"{i}.xml", names + names[:1])
    ds = load_voc(root, "train")  # auto: no masks, so XML
    assert ds.label_source.startswith("XML annotations")
    assert [ds.labels(s) for s in ds.samples] == [_gt_labels(i) for i in ids]
    assert ds.gt_dir is None


def test_labels_from_a_json_file_and_from_cls_labels_npy(tree):
    root, ids = tree
    table = {i: [NAMES[k] for k in _gt_labels(i)] for i in ids}
    (root / "labels.json").write_text(json.dumps(table))
    ds = load_voc(root, "train", labels_from="file", labels_file=root / "labels.json")
    assert [ds.labels(s) for s in ds.samples] == [_gt_labels(i) for i in ids]

    # IRN's cls_labels.npy: integer ids (2007000032) -> 20-dim multi-hot over classes 1..20
    hot = {int(i.replace("_", "")): np.isin(np.arange(1, 21), _gt_labels(i)).astype(np.float32) for i in ids}
    np.save(root / "cls_labels.npy", hot)
    ds = load_voc(root, "train", labels_file=root / "cls_labels.npy")  # auto + a file = file
    assert [ds.labels(s) for s in ds.samples] == [_gt_labels(i) for i in ids]


def test_label_file_errors_name_the_file_and_the_problem(tree):
    root, ids = tree
    (root / "labels.json").write_text(json.dumps({ids[0]: ["aeroplane", "spaceship"]}))
    with pytest.raises(DatasetError, match=r"labels\.json.*2007_000032.*unknown class name 'spaceship'"):
        load_voc(root, "train", labels_from="file", labels_file=root / "labels.json")
    (root / "labels.json").write_text(json.dumps({ids[0]: ["aeroplane"]}))
    with pytest.raises(DatasetError, match=r"no labels for image '2007_000392'"):
        load_voc(root, "train", labels_from="file", labels_file=root / "labels.json")


def test_split_lists_are_looked_for_in_segmentation_aug_first(tree):
    root, ids = tree
    aug = root / "ImageSets" / "SegmentationAug"
    aug.mkdir()
    # DeepLab-style lines, as train_aug lists usually come
    aug.joinpath("train_aug.txt").write_text(f"/JPEGImages/{ids[1]}.jpg /SegmentationClassAug/{ids[1]}.png\n")
    (root / "labels.json").write_text(json.dumps({i: ["person"] for i in ids}))
    ds = load_voc(root, "trainaug", labels_file=root / "labels.json")
    assert ds.split == "train_aug" and [s.id for s in ds.samples] == [ids[1]]
    with pytest.raises(DatasetError, match=r"no split list for 'val'.*SegmentationAug/val\.txt.*Segmentation/val\.txt"):
        load_voc(root, "val", labels_file=root / "labels.json")
    with pytest.raises(DatasetError, match="unknown VOC split 'test'"):
        load_voc(root, "test")


def test_prompts_command_shows_the_prompt_and_the_spans(tiny_model_dir):
    res = CliRunner().invoke(app, ["prompts", "horse, person", "--model", str(tiny_model_dir)])
    assert res.exit_code == 0, res.output
    assert ("prompt (32 of 77 tokens): a photo including horse, person with clothes, tree, river, sea, lake, "
            "water, railway, railroad, track, stone, and rocks.") in res.output
    assert " 13 horse                tokens 4..4: horse</w>" in res.output
    assert " 15 person               tokens 6..8: person</w> with</w> clothes</w>" in res.output
    res = CliRunner().invoke(app, ["prompts", "horse, unicorn", "--model", str(tiny_model_dir)])
    assert res.exit_code == 2 and "unknown class name 'unicorn'" in res.output
