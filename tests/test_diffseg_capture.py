"""The Kandinsky 2.2 model layer and the added-KV attention capture on the tiny random
Kandinsky-2.2-layout model (float64 where equality is asserted)."""
import json

import numpy as np
import pytest
import torch

from text2mask.errors import ModelLoadError
from text2mask.modeling import kandinsky
from text2mask.modeling.added_kv import AddedKVCapture, added_kv_layers
from tiny_kandinsky import make_tiny_kandinsky, tiny_components

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_kandinsky(tmp_path_factory.mktemp("kandinsky") / "model")


@pytest.fixture(scope="module")
def base(tiny_dir):
    return kandinsky.load(str(tiny_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def unet64(base):
    import copy

    return copy.deepcopy(base.unet).double()


def _inputs(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, 16, 16, generator=g, dtype=torch.float64),
            torch.randn(b, 16, generator=g, dtype=torch.float64))


def test_layers_in_forward_order_with_their_grids(unet64):
    layers = added_kv_layers(unet64)
    assert [(l.name, l.factor) for l in layers] == [
        ("down_blocks.1.attentions.0", 2), ("down_blocks.2.attentions.0", 4), ("down_blocks.3.attentions.0", 8),
        ("mid_block.attentions.0", 8), ("up_blocks.0.attentions.0", 8), ("up_blocks.0.attentions.1", 8),
        ("up_blocks.1.attentions.0", 4), ("up_blocks.1.attentions.1", 4), ("up_blocks.2.attentions.0", 2),
        ("up_blocks.2.attentions.1", 2)]


def test_capture_equals_the_stock_processor(unet64):
    z, e = _inputs()
    stock = unet64(z, 100, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": e}).sample
    with AddedKVCapture(unet64, stop_early=False) as cap:
        maps = cap.run(z, 100, e)
    assert (cap.output - stock).abs().max() <= 1e-12
    assert len(maps) == 10
    for m in maps:
        n = m.grid[0] * m.grid[1]
        assert m.self_attn.shape == (2, n, n) and m.cross.shape == (2, *m.grid)
        assert (m.self_attn.sum(-1) - 1).abs().max() <= 1e-12 and (m.self_attn >= 0).all()
        assert ((m.cross > 0) & (m.cross < 1)).all()
    # the processors are restored
    assert {type(p).__name__ for p in unet64.attn_processors.values()} == {"AttnAddedKVProcessor2_0"}


def test_context_columns_come_first(unet64):
    """The cross map of one layer against an independent computation, head by head, of the
    joint softmax over [32 context keys; spatial keys]."""
    z, e = _inputs(1)
    attn = unet64.get_submodule("up_blocks.1.attentions.0")
    seen = {}
    handle = attn.register_forward_pre_hook(lambda mod, args, kw: seen.update(x=args[0], ctx=kw.get(
        "encoder_hidden_states")), with_kwargs=True)
    try:
        with AddedKVCapture(unet64) as cap:
            maps = cap.run(z, 100, e)
    finally:
        handle.remove()
    x = seen["x"].flatten(2).transpose(1, 2)
    xn = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
    heads = attn.heads
    d = attn.to_q.out_features // heads
    mass = torch.zeros(x.shape[:2], dtype=torch.float64)
    selfs = torch.zeros(x.shape[0], x.shape[1], x.shape[1], dtype=torch.float64)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        q = attn.to_q(xn)[..., sl]
        keys = torch.cat([attn.add_k_proj(seen["ctx"])[..., sl], attn.to_k(xn)[..., sl]], dim=1)
        p = torch.softmax(q @ keys.transpose(1, 2) / d ** 0.5, dim=-1)
        mass += p[..., :32].sum(-1) / heads
        selfs += p[..., 32:] / heads
    got = maps[6]
    assert got.layer.name == "up_blocks.1.attentions.0"
    assert torch.allclose(got.cross.flatten(1), mass, atol=1e-12, rtol=0)
    assert torch.allclose(got.self_attn, selfs / selfs.sum(-1, keepdim=True), atol=1e-12, rtol=0)


def test_stop_early_skips_the_last_up_block_and_changes_no_map(unet64):
    z, e = _inputs(2)
    calls = []
    handle = unet64.up_blocks[3].register_forward_hook(lambda *a: calls.append(1))
    try:
        with AddedKVCapture(unet64, stop_early=True) as cap:
            early = cap.run(z, 100, e)
        assert calls == [] and cap.output is None
        with AddedKVCapture(unet64, stop_early=False) as cap:
            full = cap.run(z, 100, e)
        assert calls == [1]
    finally:
        handle.remove()
    for a, b in zip(early, full):
        assert torch.equal(a.cross, b.cross) and torch.equal(a.self_attn, b.self_attn)


def test_movq_helpers_and_clip_pixels(base):
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        assert torch.equal(base.encode(x), base.movq.encode(x).latents)      # no scaling factor
        assert base.encode(x).shape == (1, 4, 16, 16) and base.latent_factor == 8 and base.context_tokens == 32
    rgb = np.random.default_rng(0).integers(0, 256, (128, 128, 3)).astype(np.uint8)
    from PIL import Image

    ref = np.asarray(Image.fromarray(rgb).resize((224, 224), Image.BICUBIC), np.float32) / 255
    ref = (ref - np.array(base.clip.mean, np.float32)) / np.array(base.clip.std, np.float32)
    px = kandinsky.clip_pixels([rgb], base.clip)
    assert px.shape == (1, 3, 224, 224)
    np.testing.assert_allclose(px[0].permute(1, 2, 0).numpy(), ref, atol=1e-6)


def test_info_and_random_marker(base, tiny_dir):
    assert base.info["family"] == "kandinsky22" and base.info["random_weights"] is True
    assert base.info["attention_layers"] == 10 and len(base.info["folder_sha256"]) == 64
    assert kandinsky.is_kandinsky22(json.loads((tiny_dir / "decoder/unet/config.json").read_text()))
    assert not kandinsky.is_kandinsky22({"encoder_hid_dim_type": None, "addition_embed_type": None})


def test_pipelines_in_memory_are_wrapped_not_copied():
    from diffusers import KandinskyV22Pipeline
    from types import SimpleNamespace

    unet, movq, encoder, processor, scheduler = tiny_components(0)
    decoder = KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq)
    prior = SimpleNamespace(image_encoder=encoder, image_processor=processor)
    k = kandinsky.Kandinsky22.from_pipes(decoder, prior)
    assert k.unet is unet and k.movq is movq and k.image_encoder is encoder
    assert k.info["source"] == "pipeline" and k.clip.crop == (224, 224)
    with pytest.raises(ModelLoadError, match="image_encoder"):
        kandinsky.Kandinsky22.from_pipes(decoder, SimpleNamespace(image_processor=processor))


def test_layout_check_names_what_it_found(tmp_path):
    from diffusers import UNet2DConditionModel

    unet, movq, encoder, _, _ = tiny_components(0)
    sd_unet = UNet2DConditionModel(block_out_channels=(32, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                   norm_num_groups=8, layers_per_block=1, sample_size=8)
    with pytest.raises(ModelLoadError, match="encoder_hid_dim_type=None.*Stable Diffusion"):
        kandinsky.check_layout(sd_unet, movq, encoder, "test model")
    # a prior of another model: its projection width does not fit the UNet
    encoder.config.projection_dim = 24
    with pytest.raises(ModelLoadError, match="projection_dim 24"):
        kandinsky.check_layout(unet, movq, encoder, "test model")
    # a folder whose UNet is Stable Diffusion's: refused from its config, before any weights
    for sub in ("unet", "movq", "scheduler"):
        (tmp_path / "decoder" / sub).mkdir(parents=True)
    (tmp_path / "decoder/unet/config.json").write_text(json.dumps(dict(sd_unet.config)))
    with pytest.raises(ModelLoadError, match="not a Kandinsky 2.2 decoder"):
        kandinsky.load(str(tmp_path), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no unet/, movq/, scheduler/"):
        kandinsky.load(str(tmp_path / "empty"), device="cpu")


def test_hub_ids_offline_fail_with_a_message(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))            # an empty cache
    with pytest.raises(ModelLoadError, match="(?s)HF_HUB_OFFLINE.*hf download"):
        kandinsky.load(kandinsky.DECODER_ID, device="cpu")
    with pytest.raises(ModelLoadError, match="not a hub id"):
        kandinsky.load("no such folder, not an id", device="cpu")
