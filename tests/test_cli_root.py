"""The command line's shared conventions, through the real CLI: --version, -v/-q, the
exit codes of text2mask.errors (2 config, 3 crashed, 130 interrupted), --device checked
before any model loads, option groups in --help."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from text2mask import __version__
from text2mask.cli import app
from text2mask.errors import EXIT_CONFIG, EXIT_CRASHED, EXIT_INTERRUPTED

VOC = Path(__file__).resolve().parent.parent / "samples" / "voc-mini" / "VOC2012"
GT = VOC / "SegmentationClass"
PHOTO = VOC / "JPEGImages" / "2007_000039.jpg"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def errors(res) -> list[str]:
    return [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]


def test_version():
    res = invoke("--version")
    assert res.exit_code == 0 and res.stdout.strip() == f"text2mask {__version__}"


def test_quiet_keeps_warnings_and_drops_info(tmp_path):
    # GT of 19 images, predictions for 2 (the GT itself): a warning counts the 17 unscored.
    pred = tmp_path / "pred"
    pred.mkdir()
    for i in ("2007_000032", "2007_000039"):
        (pred / f"{i}.png").write_bytes((GT / f"{i}.png").read_bytes())
    out = tmp_path / "m.json"
    normal = invoke("evaluate", "--pred", pred, "--gt", GT, "--json", out)
    quiet = invoke("-q", "evaluate", "--pred", pred, "--gt", GT, "--json", out)
    for res in (normal, quiet):
        assert res.exit_code == 0, res.output
        assert "warning: 17 ground-truth image(s)" in res.stderr
        assert "mIoU: 100.0%" in res.stdout
    assert f"metrics in {out}" in normal.stderr
    assert "metrics in" not in quiet.stderr


def test_unexpected_error_is_one_line_exit_3_and_traceback_with_v(tmp_path, monkeypatch):
    import text2mask.evaluation.semantic as semantic

    def broken(*args, **kwargs):
        raise RuntimeError("disk controller on fire")

    monkeypatch.setattr(semantic, "evaluate_dirs", broken)
    res = invoke("evaluate", "--pred", GT, "--gt", GT)
    assert res.exit_code == EXIT_CRASHED
    assert res.stderr.strip().splitlines() == [
        "error: RuntimeError: disk controller on fire (crashed; rerun with -v for the traceback)"]
    verbose = invoke("-v", "evaluate", "--pred", GT, "--gt", GT)
    assert verbose.exit_code == EXIT_CRASHED
    assert "Traceback (most recent call last)" in verbose.stderr and "disk controller on fire" in verbose.stderr


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    """A real SIGINT delivered to a real process in the middle of `evaluate`."""
    script = textwrap.dedent(f"""
        import os, signal
        import text2mask.evaluation.semantic as semantic
        from text2mask.cli import app

        real = semantic.read_index_png
        def read_and_interrupt(path):
            os.kill(os.getpid(), signal.SIGINT)   # the user presses Ctrl-C here
            return real(path)
        semantic.read_index_png = read_and_interrupt
        app(["evaluate", "--pred", {str(GT)!r}, "--gt", {str(GT)!r}], prog_name="text2mask")
    """)
    # As a terminal delivers it: a suite started in the background (``cmd &``) would
    # otherwise hand the child an ignored SIGINT.
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == EXIT_INTERRUPTED, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: interrupted"], proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("device, text", [
    ("gpu", "'gpu' is not a device; use auto, cpu, cuda, cuda:N or mps"),
    ("cuda", "no CUDA GPU on this machine"),
    ("cuda:9", "cuda:9"),
])
def test_unusable_device_is_refused_before_any_model_loads(device, text, tmp_path):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    # The model path does not exist: had the load started, its error would be the one shown.
    res = invoke("segment", PHOTO, "--labels", "dog", "--device", device,
                 "--model", tmp_path / "no-such-model", "--out", tmp_path / "out")
    assert res.exit_code == EXIT_CONFIG, res.output
    assert len(errors(res)) == 1 and text in errors(res)[0], res.stderr
    assert "no-such-model" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_dtype_is_a_choice(tmp_path):
    res = invoke("segment", PHOTO, "--labels", "dog", "--dtype", "float8", "--out", tmp_path)
    assert res.exit_code == 2 and "float8" in res.output


def test_help_groups_options():
    res = invoke("segment", "--help")
    assert res.exit_code == 0
    for panel in ("Data", "Output", "Model", "Method"):
        assert f"─ {panel} ─" in res.stdout, panel


def test_help_into_a_reader_that_stops_early_exits_0():
    """`text2mask --help | head -1`: the closed pipe is not a failure."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "text2mask", "--help"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()    # closed before the help is written (imports take a second): EPIPE for sure
    assert p.wait(timeout=60) == 0, p.stderr.read().decode()
