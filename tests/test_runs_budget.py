"""The memory budget of one UNet call (issue 10.4), and saved / replayed draws (issue 9.3),
with the tiny model on real VOC photos (MEANINGLESS masks: mechanics only)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from text2mask.data.folder import load_folder
from text2mask.errors import ConfigError
from text2mask.modeling.latents import Draws, image_seed
from text2mask.preprocess import geometry
from text2mask.runs.budget import parse_budget
from text2mask.wsss.predictor import MaskConfig, Text2Mask
from text2mask.wsss.run import RunOptions, WsssMethod, generate, largest_geometry, row_bytes

VOC = Path(__file__).resolve().parent.parent / "samples" / "voc-mini" / "VOC2012"
A, B = "2007_000039", "2007_000063"      # both 500x375: one padded size, one batch


def test_parse_budget():
    assert parse_budget("8GB") == 8 * 2**30 and parse_budget("512mib") == 512 * 2**20
    assert parse_budget("1.5g") == int(1.5 * 2**30) and parse_budget("1000") == 1000
    assert parse_budget("auto") is None and parse_budget("none") == 0
    for bad in ("lots", "-1GB", "8 parsecs"):
        with pytest.raises(ConfigError, match="--memory-budget"):
            parse_budget(bad)


def test_largest_geometry_is_the_largest_padded_input():
    g = largest_geometry()
    brute = max((geometry(h, w) for h in range(1, 1100, 7) for w in (1000, 1500, 3000)),
                key=lambda x: x.padded_height * x.padded_width)
    assert g.padded_height * g.padded_width >= brute.padded_height * brute.padded_width
    assert (g.padded_height, g.padded_width) == (704, 704)


def test_row_cost_counts_the_captured_attention(voc_predictor):
    """By hand for the tiny UNet at 500x375 (padded 576x768, latent 72x96): block 11 (Self)
    runs at half resolution (36x48), the cross blocks 4..8 at 1/4, 1/4, 1/8, 1/4, 1/4."""
    unet, geo = voc_predictor.sd.unet, geometry(375, 500)
    assert geo.latent == (72, 96)
    heads = unet.up_blocks[2].attentions[1].transformer_blocks[0].attn1.heads     # block 11
    n11 = 36 * 48
    cross = sum((72 // f) * (96 // f) for f in (4, 4, 8, 4, 4)) * 77
    assert row_bytes(unet, geo) == 4 * (2 * heads * n11 ** 2 + n11 ** 2 + cross)


def test_samples_that_cannot_fit_are_refused_up_front(voc_predictor, tmp_path):
    many = Text2Mask(voc_predictor.sd, "voc", MaskConfig(samples=100))
    need = 100 * row_bytes(voc_predictor.sd.unet, largest_geometry())
    ds = load_folder(_photos(tmp_path, [A]), tmp_path / "labels.json", "voc")
    with pytest.raises(ConfigError, match="--samples 100 needs about .* over --memory-budget"):
        WsssMethod(many, ds, RunOptions(out=tmp_path / "out", memory_budget=need - 1))
    WsssMethod(many, ds, RunOptions(out=tmp_path / "out", memory_budget=need))


def _photos(root: Path, keys, labels=("tvmonitor",)) -> Path:
    (root / "photos").mkdir(parents=True, exist_ok=True)
    for k in keys:
        shutil.copy(VOC / "JPEGImages" / f"{k}.jpg", root / "photos" / f"{k}.jpg")
    (root / "labels.json").write_text(json.dumps({f"{k}.jpg": list(labels) for k in keys}))
    return root / "photos"


def _pngs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/*.png"))}


def test_budget_splits_a_batch_into_calls_that_fit_with_the_same_bytes(voc_predictor, tmp_path, monkeypatch):
    ds = load_folder(_photos(tmp_path, [A, B]), tmp_path / "labels.json", "voc")
    budget = row_bytes(voc_predictor.sd.unet, largest_geometry())       # passes the up-front check
    one = row_bytes(voc_predictor.sd.unet, geometry(375, 500))          # 1 prompt x 1 sample
    assert one <= budget < 2 * one                                     # one image per call, not two
    calls = []
    attend = voc_predictor.attend
    monkeypatch.setattr(voc_predictor, "attend", lambda items: calls.append([k for k, _, _ in items]) or attend(items))
    opts = dict(workers=0, progress=False, evaluate=False)
    split = generate(voc_predictor, ds, RunOptions(out=tmp_path / "split", batch_size=2, memory_budget=budget, **opts),
                     log=lambda m: None)
    assert split.done == 2 and calls == [[A], [B]]
    calls.clear()
    generate(voc_predictor, ds, RunOptions(out=tmp_path / "single", batch_size=1, **opts), log=lambda m: None)
    assert calls == [[A], [B]]
    assert _pngs(tmp_path / "split") == _pngs(tmp_path / "single")


def test_an_image_whose_prompts_exceed_the_budget_fails_alone(voc_predictor, tmp_path, monkeypatch):
    coco = Text2Mask(voc_predictor.sd, "coco", MaskConfig())
    forty = [c.name for c in coco.class_set.classes[:40]]
    assert len(coco.plan(list(range(1, 41))).prompts) >= 2             # 40 classes: two prompts, two rows
    _photos(tmp_path, [A], labels=forty)
    ds = load_folder(tmp_path / "photos", tmp_path / "labels.json", "coco")
    calls = []
    monkeypatch.setattr(coco, "attend", lambda items: calls.append(items))
    budget = row_bytes(coco.sd.unet, largest_geometry())
    res = generate(coco, ds, RunOptions(out=tmp_path / "out", memory_budget=budget, workers=0,
                                        progress=False, evaluate=False), log=lambda m: None)
    assert calls == [] and (res.done, res.failed) == (0, 1)
    assert res.failures[0]["stage"] == "model" and "--memory-budget" in res.failures[0]["error"]


def test_saved_draws_replay_byte_for_byte_and_a_changed_draw_is_redone(voc_predictor, tmp_path):
    ds = load_folder(_photos(tmp_path, [A, B]), tmp_path / "labels.json", "voc")
    opts = dict(workers=0, progress=False, evaluate=False)
    saved = tmp_path / "saved"
    generate(voc_predictor, ds, RunOptions(out=saved, save_draws=True, **opts), log=lambda m: None)
    d = Draws.load(saved / "draws" / f"{A}.safetensors")
    gen = torch.Generator().manual_seed(image_seed(0, A))              # independent: (seed, id) draws
    assert torch.equal(d.eps0, torch.randn((4, 72, 96), generator=gen))
    assert torch.equal(d.noise, torch.randn((1, 4, 72, 96), generator=gen))

    replay = tmp_path / "replay"
    generate(voc_predictor, ds, RunOptions(out=replay, draws=saved / "draws", **opts), log=lambda m: None)
    assert _pngs(replay) == _pngs(saved)

    Draws(d.eps0, -d.noise).save(saved / "draws" / f"{A}.safetensors")    # another noise for A
    again = generate(voc_predictor, ds, RunOptions(out=replay, draws=saved / "draws", **opts), log=lambda m: None)
    assert (again.done, again.skipped, again.redone_changed) == (1, 1, [A])
    assert (replay / "masks" / f"{B}.png").read_bytes() == (saved / "masks" / f"{B}.png").read_bytes()
    assert (replay / "initial" / f"{A}.png").read_bytes() != (saved / "initial" / f"{A}.png").read_bytes()
