"""Output files follow the umask (issue 10.9): a shared run folder (the multi-node recipe)
must be readable by the group when the user's umask says so. Needs the io.py change
described in the runner's report (mkstemp creates 0600)."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from PIL import Image

from text2mask.data.folder import load_folder
from text2mask.wsss.run import RunOptions, generate

VOC = Path(__file__).resolve().parent.parent / "samples" / "voc-mini" / "VOC2012"


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_output_file_follows_the_umask(voc_predictor, tmp_path, umask):
    (tmp_path / "photos").mkdir()
    with Image.open(VOC / "JPEGImages" / "2007_000032.jpg") as im:
        im.crop((0, 0, 64, 48)).save(tmp_path / "photos" / "a.jpg")
    (tmp_path / "labels.json").write_text(json.dumps({"a.jpg": []}))     # no labels: no model call
    ds = load_folder(tmp_path / "photos", tmp_path / "labels.json", "voc")
    old = os.umask(umask)
    try:
        generate(voc_predictor, ds, RunOptions(out=tmp_path / "out", workers=1, progress=False), log=lambda m: None)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert {"masks/a.png", "records/a.json", "run.json", "run.lock"} <= {str(p.relative_to(tmp_path / "out")) for p in files}
    modes = {str(p.relative_to(tmp_path / "out")): stat.S_IMODE(p.stat().st_mode) for p in files}
    assert modes == {k: 0o666 & ~umask for k in modes}
