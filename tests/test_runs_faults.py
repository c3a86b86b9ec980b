"""Faults a long run meets (issue 10.3), for real: a writer process killed by the OS, the
main process killed, Ctrl-C, a file-size limit hit while writing metrics.json. The run
records them, exits with the documented code and leaves a folder that resumes.

Real processes (`python -m text2mask generate`) with the tiny model on real VOC photos
(MEANINGLESS masks). "Busy writer" = the writer has written the big photo's record and is
inside its CRF (3 megapixels: seconds), the window the kills aim at.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from text2mask.errors import EXIT_CRASHED, EXIT_FAILED_ITEMS, EXIT_INTERRUPTED

REPO = Path(__file__).resolve().parent.parent
VOC = REPO / "samples" / "voc-mini" / "VOC2012"
SMALL = "2007_000032"


def env() -> dict:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": path}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """big.jpg (2000x1500, a slow CRF) then small.jpg, both labelled aeroplane."""
    root = tmp_path_factory.mktemp("faults")
    folder = root / "photos"
    folder.mkdir()
    with Image.open(VOC / "JPEGImages" / f"{SMALL}.jpg") as im:
        im.convert("RGB").resize((2000, 1500), Image.BILINEAR).save(folder / "big.jpg", quality=90)
        im.save(folder / "small.jpg")
    (root / "labels.json").write_text(json.dumps({"big.jpg": ["aeroplane"], "small.jpg": ["aeroplane"]}))
    return root


def command(photos: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "text2mask", "generate", "--dataset", "folder", "--images", str(photos / "photos"),
            "--labels", str(photos / "labels.json"), "--prompts", "voc", "--model", str(model), "--device", "cpu",
            "--out", str(out), "--no-progress", *extra]


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc)."""
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
            for k in kids:
                if k not in found:
                    found.add(k)
                    todo.append(k)
    return found


def alive(pids: set[int]) -> set[int]:
    out = set()
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state != "Z":
            out.add(p)
    return out


def writer_pid(main: int) -> int | None:
    for p in descendants(main):
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except FileNotFoundError:
            continue
        if "spawn_main" in cmd and "resource_tracker" not in cmd:
            return p
    return None


def terminal_sigint() -> None:
    """Ctrl-C as a terminal delivers it: a shell that starts the suite in the background
    (``cmd &``) makes its children ignore SIGINT, and that disposition is inherited."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_busy(cmd: list[str], out: Path, log: Path, **popen) -> subprocess.Popen:
    """Start ``cmd`` and return once its writer is inside the big photo's CRF."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=open(log, "w"), **popen)
    deadline = time.monotonic() + 900
    while not (out / "records" / "big.json").is_file():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the writer never started on the big photo"
        time.sleep(0.05)
    return proc


def wait_gone(pids: set[int], seconds: float = 120) -> set[int]:
    deadline = time.monotonic() + seconds
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive(pids)


def test_killed_writer_fails_its_image_and_the_run_goes_on(photos, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    proc = start_busy(command(photos, tiny_model_dir, out, "--workers", "1"), out, tmp_path / "log")
    worker = writer_pid(proc.pid)
    assert worker is not None
    os.kill(worker, signal.SIGKILL)
    assert proc.wait(timeout=900) == EXIT_FAILED_ITEMS, (tmp_path / "log").read_text()
    stderr = (tmp_path / "log").read_text()
    assert "Traceback" not in stderr
    fails = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["id"], f["stage"]) for f in fails] == [("big", "crf/write")]
    assert "writer process died" in fails[0]["error"]
    assert (out / "masks" / "small.png").is_file() and not (out / "masks" / "big.png").exists()
    assert "restarted 1 time" in stderr
    assert json.loads((out / "run.json").read_text())["status"] == "failed"

    again = subprocess.run(command(photos, tiny_model_dir, out, "--workers", "1"), env=env(),
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr
    assert "done: 1 written" in again.stderr and "1 already complete" in again.stderr
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def test_killed_main_process_leaves_no_worker_behind(photos, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    proc = start_busy(command(photos, tiny_model_dir, out, "--workers", "1"), out, tmp_path / "log")
    below = descendants(proc.pid)
    assert writer_pid(proc.pid) in below
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert wait_gone(below) == set(), "processes left behind after the main process was killed"


def test_ctrl_c_prints_one_line_and_exits_130(photos, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    log = tmp_path / "log"
    proc = start_busy(command(photos, tiny_model_dir, out, "--workers", "1"), out, log, start_new_session=True,
                      preexec_fn=terminal_sigint)
    below = descendants(proc.pid)
    before = log.read_text()
    os.killpg(proc.pid, signal.SIGINT)          # what a terminal's Ctrl-C does: the whole group
    assert proc.wait(timeout=300) == EXIT_INTERRUPTED
    after = log.read_text()[len(before):]
    assert "Traceback" not in after and "KeyboardInterrupt" not in after, after
    assert [ln for ln in after.splitlines() if ln.strip()] == ["error: interrupted"], after
    assert wait_gone(below) == set()
    status = json.loads((out / "status" / "all.json").read_text())
    assert status["status"] == "interrupted"


def test_file_size_limit_on_metrics_ends_with_the_summary_and_resumes(tiny_model_dir, tmp_path):
    """`ulimit -f 16`: the masks (83 bytes) and run.json (~9 KB) fit, metrics.json (~26 KB) does not."""
    root = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    with Image.open(VOC / "JPEGImages" / f"{SMALL}.jpg") as im:
        im.crop((100, 50, 164, 98)).save(root / "JPEGImages" / "crop.jpg", quality=95)
    with Image.open(VOC / "SegmentationClass" / f"{SMALL}.png") as im:
        im.crop((100, 50, 164, 98)).save(root / "SegmentationClass" / "crop.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("crop\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "text2mask", "generate", "--data-root", str(root), "--model", str(tiny_model_dir),
           "--device", "cpu", "--out", str(out), "--workers", "0", "--no-progress"]
    limited = subprocess.run(["bash", "-c", 'ulimit -f 16 && exec "$@"', "bash", *cmd], env=env(),
                             capture_output=True, text=True, timeout=900)
    assert limited.returncode == EXIT_CRASHED, limited.stderr
    assert "done: 1 written" in limited.stderr
    assert "metrics.json: cannot write" in limited.stderr and "can be resumed" in limited.stderr
    assert "Traceback" not in limited.stderr
    assert not (out / "metrics.json").exists()
    assert (out / "masks" / "crop.png").is_file()

    again = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr
    assert "1 already complete" in again.stderr
    assert json.loads((out / "metrics.json").read_text())["images"] == 1
