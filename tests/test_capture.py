"""Stage 2: attention capture on the tiny SD v1-layout model (ALGORITHM.md sections 2-3).

Maps are checked against softmax(QK^T / sqrt(d)) recomputed from each layer's own
to_q / to_k applied to the input the layer really received (grabbed with a pre-hook).
"""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from text2mask.modeling.capture import AttentionCapture, transformer_blocks
from text2mask.preprocess import geometry

JPEG = Path(__file__).resolve().parent.parent / "samples/voc-mini/VOC2012/JPEGImages/2007_000039.jpg"
PROMPT = ("a photo including horse, person with clothes, tree, river, sea, lake, water, railway, "
          "railroad, track, stone, and rocks.")
TABLE = [  # ALGORITHM.md section 3: (diffusers module, resolution factor), forward order
    ("down_blocks.0.attentions.0", 1), ("down_blocks.0.attentions.1", 1),
    ("down_blocks.1.attentions.0", 2), ("down_blocks.1.attentions.1", 2),
    ("down_blocks.2.attentions.0", 4), ("down_blocks.2.attentions.1", 4),
    ("mid_block.attentions.0", 8),
    ("up_blocks.1.attentions.0", 4), ("up_blocks.1.attentions.1", 4), ("up_blocks.1.attentions.2", 4),
    ("up_blocks.2.attentions.0", 2), ("up_blocks.2.attentions.1", 2), ("up_blocks.2.attentions.2", 2),
    ("up_blocks.3.attentions.0", 1), ("up_blocks.3.attentions.1", 1), ("up_blocks.3.attentions.2", 1),
]
HOOKED = {f"{TABLE[i][0]}.transformer_blocks.0.attn2.processor" for i in (4, 5, 6, 7, 8)} | {
    f"{TABLE[11][0]}.transformer_blocks.0.attn1.processor"}
T = torch.tensor(150)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny UNet is faster on one thread than on an oversubscribed CPU (10x under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def embed(sd, text):
    ids = sd.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77)
    with torch.no_grad():
        return sd.text_encoder(ids)[0]


@pytest.fixture(scope="module")
def inputs(sd):
    """A real VOC photo, noised at t = 150, and the prompt's embedding. To keep the tests
    fast the photo is shrunk to 256x192, a 24x32 latent (grids 3x4 at /8, 12x16 at /2)."""
    rgb = np.array(Image.open(JPEG).convert("RGB").resize((256, 192), Image.BILINEAR))
    x = torch.from_numpy(rgb).permute(2, 0, 1).float()[None] / 127.5 - 1
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z = sd.vae.encode(x).latent_dist.mean * sd.latent_scale
    assert z.shape == (1, 4, 24, 32)
    a = sd.alphas_cumprod[150].float()
    z_t = a.sqrt() * z + (1 - a).sqrt() * torch.randn(z.shape, generator=g)
    return z_t, embed(sd, PROMPT)


def capture(unet, latents, emb):
    with torch.no_grad(), AttentionCapture(unet) as cap:
        return cap.run(latents, T, emb)


def grab_input(module, store):
    """Pre-hook recording an attention layer's hidden_states and context."""
    def hook(mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        store.append((x.detach().clone(), kwargs.get("encoder_hidden_states")))
    return module.register_forward_pre_hook(hook, with_kwargs=True)


def softmax_maps(attn, x, context):
    """softmax(QK^T / sqrt(d)) averaged over heads, in float64."""
    q, k = attn.to_q(x).double(), attn.to_k(context).double()
    b, n, _ = q.shape
    d = q.shape[-1] // attn.heads
    q = q.view(b, n, attn.heads, d).transpose(1, 2)
    k = k.view(b, k.shape[1], attn.heads, d).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1).mean(dim=1)


def test_block_numbering(sd):
    blocks = transformer_blocks(sd.unet)
    assert [(b.index, b.name, b.factor) for b in blocks] == [(i, n, f) for i, (n, f) in enumerate(TABLE)]
    assert sd.unet.get_submodule(blocks[6].name) is sd.unet.mid_block.attentions[0]
    assert sd.unet.get_submodule(blocks[11].name) is sd.unet.up_blocks[2].attentions[1]
    for b in blocks:
        assert sd.unet.get_submodule(b.name).transformer_blocks[0].attn1.heads == 8


def test_blocks_run_in_forward_order_at_their_resolution(sd, inputs):
    """Without capture: the order and the grid each transformer block really sees."""
    z_t, emb = inputs
    seen, handles = [], []
    for name, _ in TABLE:
        def hook(mod, args, kwargs, name=name):
            seen.append((name, tuple((args[0] if args else kwargs["hidden_states"]).shape[-2:])))
        handles.append(sd.unet.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            sd.unet(z_t, T, encoder_hidden_states=emb)
    finally:
        for h in handles:
            h.remove()
    assert seen == [(name, (24 // f, 32 // f)) for name, f in TABLE]
    assert seen[6] == ("mid_block.attentions.0", (3, 4))
    assert seen[11] == ("up_blocks.2.attentions.1", (12, 16))


def test_captured_shapes_for_a_voc_latent(sd):
    """A 500x375 VOC photo gives a 96x72 latent (w x h): block 6 runs at 12x9, block 11 at 48x36."""
    assert geometry(375, 500).latent == (72, 96)
    z_t = torch.randn((1, 4, 72, 96), generator=torch.Generator().manual_seed(1))
    maps = capture(sd.unet, z_t, embed(sd, PROMPT))
    assert sorted(maps.cross) == [4, 5, 6, 7, 8]
    for i in (4, 5, 7, 8):
        assert tuple(maps.cross[i].shape) == (1, 18, 24, 77)
    assert tuple(maps.cross[6].shape) == (1, 9, 12, 77)  # latent / 8
    assert maps.grid == (36, 48)                         # latent / 2
    assert tuple(maps.self_attn.shape) == (1, 36 * 48, 36 * 48)


@pytest.mark.parametrize("block, kind", [(6, "attn2"), (4, "attn2"), (11, "attn1")])
def test_captured_map_equals_recomputed_softmax(sd, inputs, block, kind):
    z_t, emb = inputs
    attn = getattr(sd.unet.get_submodule(TABLE[block][0]).transformer_blocks[0], kind)
    grabbed = []
    handle = grab_input(attn, grabbed)
    try:
        maps = capture(sd.unet, z_t, emb)
    finally:
        handle.remove()
    assert len(grabbed) == 1
    x, context = grabbed[0]
    if kind == "attn2":
        assert context is not None and torch.equal(context, emb)
        with torch.no_grad():
            expected = softmax_maps(attn, x, context)
        got = maps.cross[block]
        h, w = 24 // TABLE[block][1], 32 // TABLE[block][1]
        assert tuple(got.shape) == (1, h, w, 77)
        got = got.reshape(1, h * w, 77)
    else:
        assert context is None
        with torch.no_grad():
            expected = softmax_maps(attn, x, x)
        got = maps.self_attn
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)


def test_self_attention_rows_sum_to_one(sd, inputs):
    s = capture(sd.unet, *inputs).self_attn[0].double()
    assert (s >= 0).all()
    torch.testing.assert_close(s.sum(dim=1), torch.ones(s.shape[0], dtype=torch.float64), rtol=0, atol=1e-5)
    assert not torch.allclose(s.sum(dim=0), torch.ones(s.shape[0], dtype=torch.float64), atol=1e-3)


def test_only_the_six_layers_change_processor_and_are_restored(sd, inputs):
    unet = sd.unet
    before = dict(unet.attn_processors)
    assert HOOKED <= set(before) and len(before) == 32
    during_run = {}
    probe = unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1")

    def record(mod, args):
        during_run.setdefault("p", mod.processor)

    handle = probe.register_forward_pre_hook(record)
    try:
        with torch.no_grad(), AttentionCapture(unet) as cap:
            during = dict(unet.attn_processors)
            cap.run(inputs[0], T, inputs[1])
            after_run = dict(unet.attn_processors)
    finally:
        handle.remove()
    assert during.keys() == before.keys()
    changed = {k for k in before if type(during[k]) is not type(before[k])}
    assert changed == HOOKED
    for k in set(before) - HOOKED:
        assert during[k] is before[k]
    assert after_run == during
    assert during_run["p"] is before["down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"]
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_processors_restored_after_an_error(sd):
    before = dict(sd.unet.attn_processors)
    with pytest.raises(RuntimeError):
        with AttentionCapture(sd.unet):
            raise RuntimeError("boom")
    assert all(sd.unet.attn_processors[k] is before[k] for k in before)


def test_unet_pass_stops_after_block_11(sd, inputs):
    unet = sd.unet
    fired = {}
    watched = {
        "up_blocks.3": unet.up_blocks[3],
        "conv_out": unet.conv_out,
        "block 12": unet.get_submodule("up_blocks.2.attentions.2"),
        "block 11 attn2": unet.get_submodule("up_blocks.2.attentions.1.transformer_blocks.0.attn2"),
        "block 11 attn1": unet.get_submodule("up_blocks.2.attentions.1.transformer_blocks.0.attn1"),
        "block 10": unet.get_submodule("up_blocks.2.attentions.0"),
    }
    def count(name):
        def hook(mod, args):
            fired[name] = fired.get(name, 0) + 1
        return hook

    handles = [m.register_forward_pre_hook(count(name)) for name, m in watched.items()]
    try:
        capture(unet, *inputs)
    finally:
        for h in handles:
            h.remove()
    assert fired == {"block 11 attn1": 1, "block 10": 1}


def test_capture_does_not_change_the_activations(sd, inputs):
    """The probability processors of blocks 4-8 give the fused attention's outputs: block
    11's self-attention sees the same input with and without capture."""
    attn = sd.unet.get_submodule("up_blocks.2.attentions.1.transformer_blocks.0.attn1")
    plain, captured = [], []
    handle = grab_input(attn, plain)
    try:
        with torch.no_grad():
            sd.unet(*inputs[:1], T, encoder_hidden_states=inputs[1])
    finally:
        handle.remove()
    handle = grab_input(attn, captured)
    try:
        capture(sd.unet, *inputs)
    finally:
        handle.remove()
    torch.testing.assert_close(captured[0][0], plain[0][0], rtol=0, atol=1e-5)


def test_conditional_only_equals_conditional_row_of_guidance_batch(sd, inputs):
    z_t, cond = inputs
    uncond = embed(sd, "")
    assert not torch.allclose(uncond, cond)
    single = capture(sd.unet, z_t, cond)
    pair = capture(sd.unet, torch.cat([z_t, z_t]), torch.cat([uncond, cond]))
    for i in (4, 5, 6, 7, 8):
        assert pair.cross[i].shape[0] == 2
        torch.testing.assert_close(pair.cross[i][1], single.cross[i][0], rtol=0, atol=1e-5)
        assert (pair.cross[i][0] - single.cross[i][0]).abs().max() > 1e-3  # the rows do differ
    torch.testing.assert_close(pair.self_attn[1], single.self_attn[0], rtol=0, atol=1e-5)
