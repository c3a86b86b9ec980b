"""One configuration per folder (issue 10.1) and the folder's status over shards (issue 17.4).

The lock is exercised directly (and raced by real processes); the status through real
runs of images without labels (no model call: seconds) plus one broken photo.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from text2mask.data.folder import load_folder
from text2mask.errors import ConfigMismatch
from text2mask.runs.engine import shard_of
from text2mask.runs.folder import STALE_AFTER, claim
from text2mask.runs.manifest import model_identity
from text2mask.runs.records import config_digest
from text2mask.wsss.run import RunOptions, generate

VOC = Path(__file__).resolve().parent.parent / "samples" / "voc-mini" / "VOC2012"


def fingerprint(seed: int) -> dict:
    return {"method": {"seed": seed}, "model": {"folder_sha256": "x"}}


def take(out: Path, seed: int, overwrite: bool = False):
    fp = fingerprint(seed)
    return claim(out, fp, config_digest(fp), overwrite)


def test_same_configuration_joins_another_is_refused(tmp_path):
    first, second = take(tmp_path, 0), take(tmp_path, 0)          # a resume or a shard joins
    with pytest.raises(ConfigMismatch, match=r"different configuration \(differs in: method\).*--overwrite"):
        take(tmp_path, 1)
    with pytest.raises(ConfigMismatch, match="being written now"):
        take(tmp_path, 1, overwrite=True)                          # seed 0 is still writing
    first.release(), second.release()                              # both ended
    third = take(tmp_path, 1, overwrite=True)
    third.verify()
    with pytest.raises(ConfigMismatch, match="taken over"):
        first.verify()                                             # a straggler stops at its next batch
    assert json.loads((tmp_path / "run.lock").read_text())["fingerprint"] == fingerprint(1)


def _hold(out: str, ready) -> None:
    take(Path(out), 0)
    ready.set()
    time.sleep(600)


def test_overwrite_waits_for_a_killed_writer_to_go_silent(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(tmp_path), ready))
    holder.start()
    try:
        assert ready.wait(120)
        with pytest.raises(ConfigMismatch, match=f"being written now .*pid {holder.pid}"):
            take(tmp_path, 1, overwrite=True)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(60)
    with pytest.raises(ConfigMismatch, match="being written now"):
        take(tmp_path, 1, overwrite=True)                          # its heartbeat is still fresh
    silent = time.time() - STALE_AFTER - 1
    for p in (tmp_path / ".holders").glob("*.json"):
        os.utime(p, (silent, silent))                              # ... until it is STALE_AFTER old
    take(tmp_path, 1, overwrite=True).verify()


def _race(out: str, seed: int, start, results) -> None:
    start.wait()
    try:
        take(Path(out), seed)
        results.put((seed, "claimed"))
    except ConfigMismatch:
        results.put((seed, "refused"))


def test_processes_racing_for_a_new_folder_one_configuration_wins(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "out"), seed, start, results)) for seed in (0, 1, 2, 3)]
    (tmp_path / "out").mkdir()
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    got = dict(results.get(timeout=10) for _ in procs)
    winners = [s for s, r in got.items() if r == "claimed"]
    assert len(winners) == 1, got
    assert json.loads((tmp_path / "out" / "run.lock").read_text())["fingerprint"] == fingerprint(winners[0])


def test_model_identity_ignores_how_the_local_path_was_typed():
    info = {"model": "tiny", "local": True, "device": "cpu", "dtype": "float32", "folder_sha256": "abc"}
    assert model_identity(info) == model_identity({**info, "model": "/abs/path/tiny"})
    assert model_identity(info) != model_identity({**info, "device": "cuda:0"})
    hub = {"model": "CompVis/stable-diffusion-v1-4", "local": False, "device": "cuda:1", "revision": "main"}
    assert model_identity(hub)["model"] == "CompVis/stable-diffusion-v1-4"
    assert model_identity(hub) == model_identity({**hub, "device": "cuda:0"})


# -- real runs of images without labels (all-background masks: no model call) --------------

def make_photos(folder: Path, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with Image.open(VOC / "JPEGImages" / "2007_000032.jpg") as im:
        small = im.crop((0, 0, 64, 48))
        for n in names:
            small.save(folder / f"{n}.jpg")


def names_in_shards(count: int, per_shard: int) -> list[list[str]]:
    """Image names, ``per_shard`` of each of ``count`` shards."""
    shards = [[] for _ in range(count)]
    i = 0
    while min(len(s) for s in shards) < per_shard:
        key = f"img{i:03d}"
        if len(shards[shard_of(key, count)]) < per_shard:
            shards[shard_of(key, count)].append(key)
        i += 1
    return shards


def run(predictor, ds, out, **opts):
    return generate(predictor, ds, RunOptions(out=out, workers=0, progress=False, **opts), log=lambda m: None)


def test_relative_and_absolute_data_paths_are_one_configuration(voc_predictor, tmp_path, monkeypatch):
    make_photos(tmp_path / "photos", ["a", "b"])
    (tmp_path / "labels.json").write_text(json.dumps({"a.jpg": [], "b.jpg": []}))
    monkeypatch.chdir(tmp_path)
    first = run(voc_predictor, load_folder(Path("photos"), Path("labels.json"), "voc"), Path("out"))
    assert first.done == 2
    again = run(voc_predictor, load_folder(tmp_path / "photos", tmp_path / "labels.json", "voc"), tmp_path / "out")
    assert (again.done, again.skipped) == (0, 2)


def test_folder_status_is_the_union_of_the_shards(voc_predictor, tmp_path):
    shard0, shard1 = names_in_shards(2, 2)
    make_photos(tmp_path / "photos", shard0 + shard1)
    (tmp_path / "photos" / f"{shard1[0]}.jpg").write_text("not a photo\n")     # fails in shard 1
    labels = {f"{n}.jpg": [] for n in shard0 + shard1}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    ds = load_folder(tmp_path / "photos", tmp_path / "labels.json", "voc")
    out = tmp_path / "out"

    one = run(voc_predictor, ds, out, shard=(1, 2))
    assert (one.done, one.failed) == (1, 1)
    assert one.failures_file == str(out / "failures-shard1of2.jsonl")
    assert one.status == "failed"
    zero = run(voc_predictor, ds, out, shard=(0, 2))             # finishes later, without failures
    assert (zero.done, zero.failed) == (2, 0)
    doc = json.loads((out / "run.json").read_text())
    assert doc["status"] == "failed" and zero.status == "failed"
    parts = {p["part"]: p for p in doc["parts"]}
    assert parts["shard1of2"]["failed"] == 1 and parts["shard0of2"]["failed"] == 0
    assert parts["shard1of2"]["failures_file"] == str(out / "failures-shard1of2.jsonl")
    assert doc["missing"]["count"] == 1 and doc["missing"]["first"] == [shard1[0]]

    # the photo is fixed and shard 1 re-run: the folder is complete
    make_photos(tmp_path / "photos", [shard1[0]])
    assert run(voc_predictor, ds, out, shard=(1, 2)).status == "complete"
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def test_shards_with_different_limits_leave_the_folder_incomplete(voc_predictor, tmp_path):
    shard0, shard1 = names_in_shards(2, 2)
    order = [shard0[0], shard1[0], shard0[1], shard1[1]]
    make_photos(tmp_path / "photos", order)
    (tmp_path / "labels.json").write_text(json.dumps({f"{n}.jpg": [] for n in order}))
    ds = load_folder(tmp_path / "photos", tmp_path / "labels.json", "voc")
    out = tmp_path / "out"
    run(voc_predictor, ds, out, shard=(0, 2), limit=4)
    last = run(voc_predictor, ds, out, shard=(1, 2), limit=2)    # shard 1 never saw order[3]
    assert last.status == "incomplete"
    doc = json.loads((out / "run.json").read_text())
    assert doc["status"] == "incomplete" and doc["missing"]["first"] == [order[3]]


def test_a_shards_error_line_names_its_own_failures_file(tmp_path, tiny_model_dir):
    shard0, shard1 = names_in_shards(2, 1)
    make_photos(tmp_path / "photos", shard0 + shard1)
    (tmp_path / "photos" / f"{shard1[0]}.jpg").write_bytes(b"")
    (tmp_path / "labels.json").write_text(json.dumps({f"{n}.jpg": [] for n in shard0 + shard1}))
    from text2mask.cli import app

    res = CliRunner().invoke(app, ["generate", "--dataset", "folder", "--images", str(tmp_path / "photos"),
                                   "--labels", str(tmp_path / "labels.json"), "--prompts", "voc",
                                   "--model", str(tiny_model_dir), "--device", "cpu", "--out", str(tmp_path / "out"),
                                   "--workers", "0", "--no-progress", "--shard", "1/2"])
    assert res.exit_code == 1, res.output
    assert f"1 image(s) failed; see {tmp_path / 'out' / 'failures-shard1of2.jsonl'}" in res.output
