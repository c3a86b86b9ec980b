"""Resuming and determinism of `text2mask generate`, with the tiny model on real VOC photos.

- A run killed with SIGKILL leaves no partial PNG; re-running the same command finishes
  the rest, says it resumed, and every PNG equals an uninterrupted run's byte for byte.
- The same seed gives the same bytes whatever the image order or the number of CRF
  worker processes; batching images in one UNet call moves the scores by float rounding
  only.
- run.json records what made the masks; a folder made with another configuration is not
  silently mixed into (exit 2) unless --overwrite.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from processes import kill_when
from text2mask.cli import app
from text2mask.data.voc import load_voc
from text2mask.io import read_image
from text2mask.preprocess import geometry
from text2mask.wsss.run import RunOptions, generate

FOLDERS = ("initial", "crf", "masks")
KILL_IDS = ["2007_000032", "2007_000063", "2007_000129"]       # 500x281, 500x375, 334x500


def pngs(out: Path) -> dict[str, bytes]:
    """Every output PNG, by 'folder/name', as bytes."""
    return {f"{f}/{p.name}": p.read_bytes() for f in FOLDERS for p in sorted((out / f).glob("*.png"))}


def leftovers(out: Path) -> list[Path]:
    """Temporary or hidden files left in the run folder or its output folders."""
    found = []
    for d in (out, *(out / f for f in FOLDERS)):
        if d.is_dir():
            found += [p for p in d.iterdir() if p.is_file() and (p.name.startswith(".") or p.suffix == ".tmp")]
    return sorted(found)


def cli_command(root: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "text2mask", "generate", "--data-root", str(root), "--split", "train",
            "--model", str(model), "--device", "cpu", "--out", str(out), "--workers", "0", "--no-progress",
            *extra]


REPO = Path(__file__).resolve().parent.parent


def child_env() -> dict:
    """A child process that imports this checkout's text2mask (installed or not)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": path}


# --------------------------------------------------------------------------------------
# Kill and resume, for real.
# --------------------------------------------------------------------------------------

def test_killed_run_resumes_to_the_same_bytes(tmp_path, tiny_model_dir, make_voc_tree):
    root = make_voc_tree(tmp_path / "VOC2012", KILL_IDS)
    ref, work = tmp_path / "uninterrupted", tmp_path / "resumed"
    n = len(KILL_IDS)

    done = subprocess.run(cli_command(root, ref, tiny_model_dir), env=child_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    reference = pngs(ref)
    assert len(reference) == 3 * n

    # Start the same command into another folder; SIGKILL it once some, not all, images are done.
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(cli_command(root, work, tiny_model_dir), env=child_env(), cwd=tmp_path,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        kill_when(proc, lambda: (work / "masks").is_dir() and any((work / "masks").glob("*.png")),
                  output=(tmp_path / "killed.log").read_text)
    finally:
        log.close()
    assert proc.returncode == -signal.SIGKILL
    complete = sorted(p.stem for p in (work / "masks").glob("*.png"))
    assert 1 <= len(complete) < n, f"killed too late to test resuming: {complete}"

    # No half-written output: every PNG there opens and decodes fully at the photo's size,
    # and a mask (written last) is only there with its initial/ and crf/ labels.
    for rel in pngs(work):
        key = Path(rel).stem
        with Image.open(work / rel) as im:
            im.load()
            assert im.mode == "L" and im.size == Image.open(root / "JPEGImages" / f"{key}.jpg").size
    for key in complete:
        assert all((work / f / f"{key}.png").is_file() for f in FOLDERS)
    # A temporary file written at the kill instant may stay; it must look like one of ours.
    stale = leftovers(work)
    for p in stale:
        assert p.name.startswith(".") and p.name.endswith(".tmp"), f"unexpected leftover {p}"
    print(f"killed after {complete}; leftovers at the kill: {[p.name for p in stale] or 'none'}")
    # The kill usually lands in the next image's model pass, so plant what a kill during a
    # write leaves (io._atomic's mkstemp file, SIGKILL skips its cleanup): a half PNG.
    todo = sorted(set(KILL_IDS) - set(complete))
    half = reference[f"masks/{todo[0]}.png"]
    planted = [work / f / f".{todo[0]}.png.k1ll3d00.tmp" for f in FOLDERS]
    for p in planted:
        p.write_bytes(half[: len(half) // 2])
    stale = sorted({*stale, *planted})

    again = subprocess.run(cli_command(root, work, tiny_model_dir), env=child_env(), cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    k = len(complete)
    assert f"resuming: {k} of {n} images already complete" in again.stderr, again.stderr
    assert f"done: {n - k} written" in again.stderr and f"{k} already complete" in again.stderr, again.stderr

    resumed = pngs(work)
    assert sorted(resumed) == sorted(reference)
    differ = [rel for rel in reference if resumed[rel] != reference[rel]]
    assert not differ, f"resumed outputs differ from the uninterrupted run: {differ}"
    # Leftovers of the killed run are ignored (never taken for outputs); none are new.
    remaining = leftovers(work)
    assert set(remaining) <= set(stale)
    print(f"leftovers after the re-run: {[p.name for p in remaining] or 'none (cleaned)'}")
    assert (work / "failures.jsonl").read_text() == ""
    assert json.loads((work / "run.json").read_text())["status"] == "complete"


# --------------------------------------------------------------------------------------
# Determinism.
# --------------------------------------------------------------------------------------

ORDER_IDS = ["2007_000032", "2007_000549"]      # 500x281 and 375x500


def test_same_seed_same_bytes_whatever_the_order_and_workers(voc_predictor, tmp_path, make_voc_tree):
    root = make_voc_tree(tmp_path / "VOC2012", ORDER_IDS,
                         splits={"train": ORDER_IDS, "val": ORDER_IDS[::-1]})
    runs = {}
    for split, workers in (("train", 0), ("val", 1)):
        ds = load_voc(root, split)
        assert [s.id for s in ds.samples] == (ORDER_IDS if split == "train" else ORDER_IDS[::-1])
        out = tmp_path / f"out-{split}-w{workers}"
        summary = generate(voc_predictor, ds, RunOptions(out=out, workers=workers, progress=False, evaluate=False),
                           log=lambda msg: None)
        assert (summary.done, summary.failed) == (len(ORDER_IDS), 0), summary.failures
        runs[(split, workers)] = pngs(out)
    a, b = runs.values()
    assert len(a) == 3 * len(ORDER_IDS) and sorted(a) == sorted(b)
    assert [rel for rel in a if a[rel] != b[rel]] == []


BATCH_IDS = ["2007_000039", "2007_000063"]      # both 500x375: one padded size, one batch


def test_batched_scores_agree_with_single_image_scores(voc_predictor):
    """batch_size > 1 runs several images in one UNet call; batched float kernels may
    round differently, so only the scores are compared, within a tolerance."""
    voc = Path(__file__).resolve().parent.parent / "samples" / "voc-mini" / "VOC2012"
    items = []
    for key in BATCH_IDS:
        rgb = read_image(voc / "JPEGImages" / f"{key}.jpg")
        gt = np.asarray(Image.open(voc / "SegmentationClass" / f"{key}.png"))
        classes = sorted(int(v) for v in np.unique(gt) if 0 < v < 21)
        items.append((key, rgb, voc_predictor.plan(classes)))
    g = {(geometry(*rgb.shape[:2]).padded_height, geometry(*rgb.shape[:2]).padded_width) for _, rgb, _ in items}
    assert len(g) == 1

    batched = voc_predictor.attend(items)
    single = [voc_predictor.attend([item])[0] for item in items]
    worst = 0.0
    for b, s in zip(batched, single):
        assert b.key == s.key and b.classes == s.classes and b.scores.shape == s.scores.shape
        assert np.isfinite(b.scores).all()
        diff = float(np.abs(b.scores - s.scores).max())
        worst = max(worst, diff)
        agree = float((b.labels == s.labels).mean())
        # Measured on this CPU (tiny model, fp32): max diff 1.7e-3 on scores in [0, 1],
        # labels equal on 99.7% of pixels (near-ties flip). Batching [a, a] moves a's
        # scores by the same amount, so it is the batched kernels, not the other image.
        print(f"{b.key}: batch 2 vs 1 max |score diff| = {diff:.3g}, labels agree on {100 * agree:.2f}%")
    assert worst < 1e-2, worst


# --------------------------------------------------------------------------------------
# Manifest and configuration guard.
# --------------------------------------------------------------------------------------

def folder_sha256(path: Path) -> str:
    """Independent digest of the model folder: relative paths and bytes, in sorted order."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_manifest_and_refusal_to_mix_configurations(tmp_path, tiny_model_dir, make_voc_tree):
    root = make_voc_tree(tmp_path / "VOC2012", ["2007_000032"])
    out = tmp_path / "out"

    def generate_cli(*extra):
        return CliRunner().invoke(app, ["generate", "--data-root", str(root), "--split", "train",
                                        "--model", str(tiny_model_dir), "--device", "cpu", "--out", str(out),
                                        "--workers", "0", "--no-progress", *extra])

    res = generate_cli()
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "run.json").read_text())
    method = manifest["fingerprint"]["method"]
    assert (method["seed"], method["samples"], method["timestep"]) == (0, 1, 150)
    assert {"box_threshold", "background_tau", "background_power", "crf", "confidence"} <= set(method)
    assert manifest["seed"] == 0
    digest = folder_sha256(Path(tiny_model_dir))
    assert manifest["model"]["folder_sha256"] == digest
    assert manifest["fingerprint"]["model"]["folder_sha256"] == digest
    assert {"text2mask", "python", "torch", "numpy", "pillow", "diffusers", "transformers"} <= set(manifest["versions"])
    assert manifest["status"] == "complete"
    before = pngs(out)

    for change in (["--seed", "1"], ["--samples", "2"]):
        res = generate_cli(*change)
        assert res.exit_code == 2, (change, res.output)
        assert "different configuration" in res.stderr and "method" in res.stderr, res.stderr
        assert "--overwrite" in res.stderr
        assert pngs(out) == before
        assert json.loads((out / "run.json").read_text())["seed"] == 0

    res = generate_cli("--seed", "1", "--overwrite")
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["seed"] == 1 and manifest["fingerprint"]["method"]["seed"] == 1
    assert sorted(pngs(out)) == sorted(before)
    assert "already complete" not in res.stderr or "0 already complete" in res.stderr
