"""Referring segmentation end to end on the tiny random model (outputs MEANINGLESS; the
mechanics are tested): the API, the dataset run on samples/refer-mini, resume, the CLI
and its refusals of bad input."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from test_refer_concept import random_concept_tensors, write_format
from text2mask.data.personal import load_refer_dataset
from text2mask.errors import DatasetError, InputError
from text2mask.personal import Concept, Query, ReferConfig, Referrer
from text2mask.personal.run import refer_dataset
from text2mask.runs import RunOptions

pytestmark = pytest.mark.usefixtures("one_thread")
SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "refer-mini"
CATS = SAMPLE / "images" / "COCO_val2014_000000039769.jpg"
SIDE = 128   # small photos keep the tiny model fast


@pytest.fixture(scope="module")
def referrer(sd):
    return Referrer(sd, ReferConfig(long_side=SIDE))


@pytest.fixture(scope="module")
def concepts_dir(sd, tmp_path_factory):
    root = tmp_path_factory.mktemp("concepts")
    for i, cid in enumerate(["cat-left", "cat-right", "handbag-left", "handbag-right"]):
        attn2, embed = random_concept_tensors(sd.unet, seed=10 + i)
        write_format(root / cid, "A", attn2, embed)
    return root


def test_api_one_photo(referrer, concepts_dir):
    c1, c2 = Concept.load(concepts_dir / "cat-left"), Concept.load(concepts_dir / "cat-right")
    r = referrer(CATS, [Query(c1, "the cat on the left"), Query(c2, "the cat on the right")], class_name="cat")
    h, w = 480, 640
    assert r.segments.shape == (h, w) and set(np.unique(r.segments)) <= {0, 1, 2}
    assert r.prompts == ["the <new1> cat on the left", "the <new1> cat on the right"]
    assert r.masks.shape == (2, h, w) and r.masks.dtype == bool
    assert sorted(r.af.tolist()) == [1, 2]                 # af: distinct segments
    assert set(r.bf.tolist()) <= {1, 2}
    # c[i, s] recomputed: the mean of A_i over each segment's grid cells
    for i in range(2):
        for s in (1, 2):
            cells = r.segment_grid == s
            if cells.any():
                assert r.correlation[i, s - 1] == pytest.approx(r.instance_maps[i][cells].mean(), abs=1e-12)
    assert r.object_area.shape == r.segment_grid.shape == r.instance_maps.shape[1:]
    assert ((r.segment_grid > 0) == r.object_area).all() or r.object_area.sum() < 2
    # the same call again gives the same bytes (seeded draws and clustering)
    again = referrer(CATS, [Query(c1, "the cat on the left"), Query(c2, "the cat on the right")], class_name="cat")
    assert np.array_equal(again.segments, r.segments) and np.array_equal(again.correlation, r.correlation)


def test_embedding_cache_is_keyed_by_concept(referrer, concepts_dir):
    c1, c2 = Concept.load(concepts_dir / "cat-left"), Concept.load(concepts_dir / "cat-right")
    maps = {}
    for c in (c1, c2):
        _, p = referrer.query_prompt(Query(c, "a cat"), "cat")
        with c.applied(referrer.sd):
            maps[c.name] = referrer._embed(c, p.text).clone()
    assert not np.allclose(maps["cat-left"].numpy(), maps["cat-right"].numpy())


def test_query_ablations_and_spans(sd, concepts_dir):
    c = Concept.load(concepts_dir / "cat-left")
    text = "the striped cat on the left"
    prompts = {}
    for mode in ("full", "subject", "context"):
        concept, p = Referrer(sd, ReferConfig(query=mode)).query_prompt(Query(c, text), "cat")
        prompts[mode] = (concept, p)
    assert prompts["full"][1].text == "the striped <new1> cat on the left"
    assert prompts["full"][1].span("phrase") == (3, 4) and prompts["full"][1].span("token") == (3,)
    assert prompts["subject"][1].text == "a <new1> cat" and prompts["subject"][0] is c
    assert prompts["context"][1].text == text and prompts["context"][0] is None
    assert prompts["context"][1].span("phrase") == (3,)


def test_bad_queries(referrer, concepts_dir):
    c = Concept.load(concepts_dir / "cat-left")
    with pytest.raises(InputError, match="no whole word 'cat'"):
        referrer(CATS, [Query(c, "the kitten on the left")], class_name="cat")
    with pytest.raises(InputError, match="1 segment"):
        referrer(CATS, [Query(c, "a cat"), Query(c, "the cat")], class_name="cat", segments=1)


def test_dataset_splits_and_errors(tmp_path):
    ds = load_refer_dataset(SAMPLE)
    assert [len(ds.split(s)) for s in ("all", "semantic", "visual", "variant")] == [4, 2, 2, 2]
    with pytest.raises(DatasetError, match="unknown split 'bogus'"):
        ds.split("bogus")
    root = tmp_path / "bad"
    shutil.copytree(SAMPLE, root)
    doc = json.loads((root / "dataset.json").read_text())
    doc["triplets"][0]["text"] = "the kitten on the left"
    (root / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="triplet 't01'.*no whole word 'cat'"):
        load_refer_dataset(root)


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.parent.name in ("segments", "masks", "masks_bf", "scores")}


def test_dataset_run_end_to_end_and_resume(referrer, concepts_dir, tmp_path):
    ds = load_refer_dataset(SAMPLE)
    out = tmp_path / "run"
    s = refer_dataset(referrer, ds, "all", concepts_dir, RunOptions(out=out, workers=0, progress=False))
    assert (s.done, s.failed, s.status) == (2, 0, "complete")
    for t in ("t01", "t02", "t05", "t06"):
        m = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(out / "masks" / f"{t}.png"))
        assert set(np.unique(m)) <= {0, 1}
    metrics = json.loads((out / "metrics.json").read_text())
    assert "MEANINGLESS" in metrics["warning"]
    assert metrics["all"]["triplets"] == 4 and metrics["all/semantic"]["triplets"] == 2
    lines = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == ["t01", "t02", "t05", "t06"]
    assert all(x["gt"] in (1, 2) and len(x["c"]) == 2 for x in lines)
    # metrics recomputed from scores.jsonl
    assert metrics["all"]["af_acc"] == pytest.approx(100 * np.mean([x["af"] == x["gt"] for x in lines]))
    assert metrics["all"]["mIoU"] == pytest.approx(100 * np.mean([x["iou_af"] for x in lines]))
    assert json.loads((out / "run.json").read_text())["method"] == "refer"
    before = _files(out)
    again = refer_dataset(referrer, ds, "all", concepts_dir, RunOptions(out=out, workers=0, progress=False))
    assert (again.done, again.skipped) == (0, 2)
    # a redone photo writes the same bytes
    (out / "segments" / "coco-1000.png").unlink()
    third = refer_dataset(referrer, ds, "all", concepts_dir, RunOptions(out=out, workers=0, progress=False))
    assert (third.done, third.skipped) == (1, 1) and _files(out) == before
    from PIL import Image

    from text2mask.personal.visualize import visualize_refer_run

    pictures = visualize_refer_run(out)
    assert [p.name for p in pictures] == ["coco-1000.png", "coco-39769.png"]
    assert Image.open(pictures[1]).width > 4 * 320
    # `text2mask visualize` recognises a refer run by its run.json and draws the same pictures
    drawn = {p: p.read_bytes() for p in pictures}
    res = _cli(["visualize", "--run", str(out), "--out", str(tmp_path / "vis")])
    assert res.exit_code == 0, res.output
    assert {p.name: (tmp_path / "vis" / p.name).read_bytes() for p in pictures} == {p.name: b for p, b in drawn.items()}


def _cli(args):
    from text2mask.cli import app

    return CliRunner().invoke(app, args)


def test_cli_one_photo_and_refusals(tiny_model_dir, concepts_dir, tmp_path):
    common = ["--model", str(tiny_model_dir), "--device", "cpu", "--long-side", str(SIDE)]
    out = tmp_path / "seg"
    ok = _cli(["refer", str(CATS), "--class", "cat", "--concept", str(concepts_dir / "cat-left"), "--text",
               "the cat on the left", "--concept", str(concepts_dir / "cat-right"), "--text", "the cat on the right",
               "--out", str(out), *common])
    assert ok.exit_code == 0, ok.output
    stem = CATS.stem
    assert (out / "segments" / f"{stem}.png").is_file() and (out / "masks" / f"{stem}-2.png").is_file()
    assert (out / "pictures" / f"{stem}.png").is_file()
    assert json.loads((out / "scores" / f"{stem}.json").read_text())["segments"] == 2

    bad = tmp_path / "bad"
    (bad / "concept").mkdir(parents=True)
    (bad / "concept" / "delta.bin").write_bytes(b"not a checkpoint")
    cases = [
        (["refer", str(CATS), "--class", "cat", "--concept", str(concepts_dir / "cat-left"), "--text", "the kitten"],
         "no whole word 'cat'"),
        (["refer", str(CATS), "--class", "cat", "--segments", "1", "--concept", str(concepts_dir / "cat-left"),
          "--text", "a cat", "--concept", str(concepts_dir / "cat-right"), "--text", "the cat"], "fewer than the 2"),
        (["refer", str(CATS), "--class", "cat", "--concept", str(bad / "concept"), "--text", "a cat"],
         "cannot read concept file"),
        (["refer", "--data-root", str(SAMPLE), "--concepts", str(concepts_dir), "--split", "bogus"],
         "unknown split 'bogus'"),
        (["refer", "--data-root", str(SAMPLE), "--concepts", str(bad), "--split", "all"], "concept folder not found"),
    ]
    for i, (args, message) in enumerate(cases):
        target = tmp_path / f"refused{i}"
        r = _cli([*args, "--out", str(target), *common])
        assert r.exit_code == 2, (args, r.output)
        assert message in r.output, (message, r.output)
        written = [p for p in target.rglob("*") if p.is_file() and p.suffix in (".png", ".json", ".jsonl")] \
            if target.exists() else []
        assert written == [], written


def _scores(out, image):
    return json.loads((out / "scores" / f"{image}.json").read_text())


def test_af_over_every_item_of_the_photo(referrer, concepts_dir, tmp_path):
    """Issue 22 item 1: scoring `semantic`, t01 (semantic) shares its photo with t02
    (visual): with --af-group photo (the default) t01's af is the Hungarian over both; with
    --af-group split it is alone, af = bf by construction, and the run says so."""
    from text2mask.personal.assign import assign_all

    ds = load_refer_dataset(SAMPLE)
    out, logs = tmp_path / "photo", []
    refer_dataset(referrer, ds, "semantic", concepts_dir, RunOptions(out=out, workers=0, progress=False),
                  log=logs.append)
    s = _scores(out, "coco-39769")
    (t01,) = s["triplets"]
    assert t01["id"] == "t01" and t01["af_group"] == ["t01", "t02"]
    c = {q["id"]: q["c"] for q in s["queries"]}
    assert set(c) == {"t01", "t02"} and c["t01"] == t01["c"]
    assert t01["af"] == assign_all(np.array([c["t01"], c["t02"]]))[0] + 1
    assert not any("by construction" in m for m in logs)

    out, logs = tmp_path / "split", []
    refer_dataset(referrer, ds, "semantic", concepts_dir, RunOptions(out=out, workers=0, progress=False),
                  log=logs.append, af_group="split")
    for image in ("coco-39769", "coco-1000"):
        (t,) = _scores(out, image)["triplets"]
        assert t["af_group"] == [t["id"]] and t["af"] == t["bf"]
    assert any("2 of 2 triplet(s) have af = bf by construction" in m for m in logs), logs


def test_one_query_without_segments_chooses_k_by_the_eigengap(referrer, concepts_dir):
    from text2mask.personal.refer import min_segments
    from text2mask.personal.spectral import eigengap_segments

    c = Concept.load(concepts_dir / "cat-left")
    r = referrer(CATS, [Query(c, "the cat on the left")], class_name="cat")
    from text2mask.io import read_image

    z_t, _ = referrer.noised_latent(CATS.stem, read_image(CATS))
    _, area, self_attn = referrer.object_area(z_t, "cat")
    assert r.segments_from == "eigengap" and min_segments(1) == 2
    assert r.num_segments == eigengap_segments(self_attn, area, 2) >= 2
    assert referrer(CATS, [Query(c, "the cat on the left")], class_name="cat", segments=1).num_segments == 1


def test_gt_masks_use_the_one_binary_reader(referrer, concepts_dir, tmp_path):
    """An RGBA ground-truth mask (white everywhere, the item opaque) scores like its grey
    original: the alpha marks the item (composited on white, every pixel was the item)."""
    from PIL import Image

    from text2mask.personal.run import ReferMethod, load_concepts, scene_items

    ds = load_refer_dataset(SAMPLE)
    out = tmp_path / "run"
    refer_dataset(referrer, ds, "all", concepts_dir, RunOptions(out=out, workers=0, progress=False))
    root = tmp_path / "rgba"
    shutil.copytree(SAMPLE, root)
    mask = root / "masks" / "coco-39769" / "cat-left.png"
    item = np.asarray(Image.open(mask)) > 0
    rgba = np.dstack([np.full(item.shape + (3,), 255, np.uint8), np.where(item, 255, 0).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(mask)
    rgba_ds = load_refer_dataset(root)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "scores.jsonl").unlink()
    method = ReferMethod(referrer, rgba_ds, "all", load_concepts(concepts_dir, rgba_ds.concepts))
    method.evaluate(copy, scene_items(rgba_ds, "all"), lambda m: None)
    assert (copy / "scores.jsonl").read_text() == (out / "scores.jsonl").read_text()
