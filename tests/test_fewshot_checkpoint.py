"""Checkpoints: our layout loads through the real loader; the released DiffewS layout
(UNet state dict with conv_in_ref.*, one unet/ level deeper) imports exactly."""
import json

import pytest
import torch

from fewshot_models import make_fewshot_checkpoint
from text2mask.errors import ModelLoadError
from text2mask.fewshot.checkpoint import FEWSHOT_JSON, import_released, load_diffews, read_info
from text2mask.fewshot.model import episode_inputs


@pytest.fixture(scope="module")
def ckpt(tiny_sd2_dir, tmp_path_factory):
    return make_fewshot_checkpoint(tiny_sd2_dir, tmp_path_factory.mktemp("fs") / "ckpt")


def _released(tiny_sd2_dir, ckpt, root):
    """A synthetic release: our checkpoint's UNet + conv_in_ref as one state dict, config
    with in_channels_ref and the custom class name, at <root>/unet/unet/ (as ModelScope)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    unet = UNet2DConditionModel.from_pretrained(ckpt / "unet")
    state = {k: v.contiguous() for k, v in unet.state_dict().items()}
    for k, v in load_file(str(ckpt / "support_conv_in.safetensors")).items():
        state[f"conv_in_ref.{k}"] = v
    folder = root / "unet" / "unet"
    folder.mkdir(parents=True)
    cfg = json.loads((ckpt / "unet" / "config.json").read_text())
    cfg.update({"_class_name": "MyUNet2DConditionModel", "in_channels_ref": 8})
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    return root


def test_our_layout_round_trip(ckpt):
    info = read_info(ckpt)
    assert info["method"] == "diffews" and info["resolution"] == 64 and info["text_condition"] == "unpadded"
    assert info["base_model_sha256"] and info["training_classes"] == list(range(6, 21))
    m = load_diffews(ckpt, device="cpu", dtype="fp32")
    assert m.sd.info["random_weights"] and m.config.resolution == 64
    assert not any(p.requires_grad for p in m.net.parameters())


def test_importer_round_trip(tiny_sd2_dir, ckpt, tmp_path):
    released = _released(tiny_sd2_dir, ckpt, tmp_path / "coco_fold0")
    with pytest.raises(ModelLoadError, match="It is a released DiffewS folder: convert it first"):
        read_info(released)
    from typer.testing import CliRunner

    from text2mask.cli import app

    r = CliRunner().invoke(app, ["fewshot", "import", "--released", str(released), "--base-model", str(tiny_sd2_dir),
                                 "--out", str(released / "unet")])
    assert r.exit_code == 2 and "lies inside the released model" in r.output, r.output
    out = import_released(released, tmp_path / "imported", base_model=str(tiny_sd2_dir), fold=0, max_shots=2)
    info = read_info(out)
    assert (info["benchmark"], info["fold"], info["max_shots"], info["text_condition"]) == ("coco20i", 0, 2, "unpadded")
    assert len(info["training_classes"]) == 60
    a = load_diffews(ckpt, device="cpu", dtype="fp32")
    b = load_diffews(out, device="cpu", dtype="fp32")
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    g = torch.Generator().manual_seed(0)
    rgb = (torch.rand(40, 56, 3, generator=g) * 255).byte().numpy()
    mask = torch.rand(40, 56, generator=g).numpy() > 0.5
    e = episode_inputs(rgb, [(rgb, mask)], 64)
    assert a.predict([e])[0].score.tolist() == b.predict([e])[0].score.tolist()


def test_bad_checkpoints_are_named(tiny_sd2_dir, tmp_path):
    with pytest.raises(ModelLoadError, match=f"no {FEWSHOT_JSON}"):
        read_info(tmp_path)
    with pytest.raises(ModelLoadError, match="no released DiffewS UNet found"):
        import_released(tmp_path, tmp_path / "x", base_model=str(tiny_sd2_dir))
    # a plain diffusers UNet (no conv_in_ref) is not a DiffewS release
    with pytest.raises(ModelLoadError, match="conv_in_ref"):
        import_released(tiny_sd2_dir, tmp_path / "y", base_model=str(tiny_sd2_dir))
