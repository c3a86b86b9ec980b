"""The bundled class sets travel with a non-editable wheel install.

A wheel is built from this checkout, installed (without dependencies) into a fresh
virtual environment, and that environment, started outside the checkout, must resolve
``voc`` and ``coco`` to the same classes as the source tree.
"""
import json
import subprocess
import sysconfig
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bundled_class_sets_resolve_from_a_wheel_install(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(dist), str(ROOT)], check=True, cwd=tmp_path)
    wheel = next(dist.glob("text2mask-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # The fresh venv's own pip (an outer `pip install --prefix` would first uninstall the
    # checkout's editable install from the running environment); --no-deps: text2mask only.
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, cwd=tmp_path)
    # Its dependencies (numpy, pillow...) from this environment: a path line in a .pth file
    # appends the folder after the venv's own, and .pth files in that folder are not run,
    # so the checkout's editable install stays out.
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "outer-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = ("import json, text2mask.classes as c; "
             "print(json.dumps({n: [c.load_class_set(n).names, str(c.bundled_path(n))] for n in ('voc', 'coco')}))")
    out = subprocess.run([str(venv / "bin" / "python"), "-I", "-c", probe], check=True, cwd=tmp_path,
                         capture_output=True, text=True).stdout
    got = json.loads(out)
    for name in ("voc", "coco"):
        names, path = got[name]
        assert path.startswith(str(venv)), path  # from the install, not the checkout
        doc = json.loads((ROOT / "prompts" / f"{name}.json").read_text())
        assert names == ["background"] + [c["name"] for c in doc["classes"]]
    assert len(got["voc"][0]) == 21 and len(got["coco"][0]) == 81
