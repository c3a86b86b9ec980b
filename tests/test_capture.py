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


pytestmark = pytest.mark.usefixtures("one_thread")


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


# --- SD 2.x layout, logits, full output, gradients, foreign processors ---------------------

SD2_HEADS = [2, 2, 4, 4, 8, 8, 8, 8, 8, 8, 4, 4, 4, 2, 2, 2]  # forward order, tiny_models.SD2_HEADS


@pytest.fixture(scope="module")
def sd2_inputs(sd2):
    """A 16x24 latent (grids 2x3 at /8, 8x12 at /2) and a real prompt's embedding."""
    g = torch.Generator().manual_seed(3)
    return torch.randn((1, 4, 16, 24), generator=g), embed(sd2, PROMPT)


def attn_of(unet, block, kind):
    return getattr(unet.get_submodule(TABLE[block][0]).transformer_blocks[0], kind)


def grab_all(unet, blocks_kinds, run):
    """Inputs of the given attention layers during run()."""
    store = {bk: [] for bk in blocks_kinds}
    handles = [grab_input(attn_of(unet, *bk), store[bk]) for bk in blocks_kinds]
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    return result, {bk: v[0] for bk, v in store.items()}


def test_sd2_layout_has_per_block_head_counts_and_linear_projections(sd2):
    assert sd2.info["family"] == "sd2" and sd2.unet.config.use_linear_projection
    blocks = transformer_blocks(sd2.unet)
    assert [(b.name, b.factor) for b in blocks] == TABLE
    heads = [sd2.unet.get_submodule(b.name).transformer_blocks[0].attn1.heads for b in blocks]
    assert heads == SD2_HEADS
    assert all(isinstance(sd2.unet.get_submodule(b.name).proj_in, torch.nn.Linear) for b in blocks)


@pytest.mark.parametrize("block, kind", [(1, "attn2"), (3, "attn2"), (6, "attn2"), (11, "attn1"), (14, "attn1")])
def test_sd2_capture_equals_softmax_per_head_count(sd2, sd2_inputs, block, kind):
    z_t, emb = sd2_inputs
    cross, selfb = ((block,), ()) if kind == "attn2" else ((), (block,))

    def run():
        with torch.no_grad(), AttentionCapture(sd2.unet, cross, selfb) as cap:
            return cap.run(z_t, T, emb)

    maps, grabbed = grab_all(sd2.unet, [(block, kind)], run)
    x, context = grabbed[(block, kind)]
    attn = attn_of(sd2.unet, block, kind)
    assert attn.heads == SD2_HEADS[block]
    with torch.no_grad():
        expected = softmax_maps(attn, x, x if context is None else context)
    h, w = 16 // TABLE[block][1], 24 // TABLE[block][1]
    got = maps.cross[block].reshape(1, h * w, 77) if kind == "attn2" else maps.self_attn
    if kind == "attn1":
        assert maps.grid == (h, w)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)


def test_logits_capture_equals_hand_computation(sd2, sd2_inputs):
    """Head-mean Q K^T / sqrt(d) of the requested columns, before any softmax."""
    z_t, emb = sd2_inputs
    tokens = [0, 2, 5, 76]

    def run():
        with torch.no_grad(), AttentionCapture(sd2.unet, (4, 8), (), cross_logits_tokens=tokens) as cap:
            return cap.run(z_t, T, emb)

    maps, grabbed = grab_all(sd2.unet, [(4, "attn2"), (8, "attn2")], run)
    for block in (4, 8):
        x, context = grabbed[(block, "attn2")]
        attn = attn_of(sd2.unet, block, "attn2")
        with torch.no_grad():
            q, k = attn.to_q(x).double(), attn.to_k(context).double()
        hd = q.shape[-1] // attn.heads
        q = q.view(1, -1, attn.heads, hd).transpose(1, 2)
        k = k.view(1, -1, attn.heads, hd).transpose(1, 2)
        expected = (q @ k.transpose(-1, -2) / math.sqrt(hd))[..., tokens].mean(dim=1)
        got = maps.cross_logits[block]
        assert tuple(got.shape) == (1, 4, 6, 4)
        torch.testing.assert_close(got.reshape(1, 24, 4).double(), expected, rtol=0, atol=1e-5)
        # and the probabilities of those columns are the softmax over all 77 logits
        assert not torch.allclose(got, maps.cross[block][..., tokens])


def test_full_pass_output_equals_plain_unet(sd2, sd2_inputs):
    z_t, emb = sd2_inputs
    with torch.no_grad():
        plain = sd2.unet(z_t, T, encoder_hidden_states=emb).sample
        with AttentionCapture(sd2.unet, (4, 5, 6, 7, 8), (13, 14, 15), stop_early=False) as cap:
            maps = cap.run(z_t, T, emb)
        with AttentionCapture(sd2.unet) as cap:
            stopped = cap.run(z_t, T, emb)
    assert stopped.output is None
    assert maps.output.shape == plain.shape == (1, 4, 16, 24)
    torch.testing.assert_close(maps.output, plain, rtol=0, atol=1e-5)
    assert (plain.abs() > 1e-3).any()


def test_several_self_blocks_are_averaged(sd2, sd2_inputs):
    z_t, emb = sd2_inputs
    with torch.no_grad():
        parts = []
        for b in (13, 14, 15):
            with AttentionCapture(sd2.unet, (), (b,)) as cap:
                parts.append(cap.run(z_t, T, emb).self_attn)
        with AttentionCapture(sd2.unet, (), (13, 14, 15)) as cap:
            avg = cap.run(z_t, T, emb)
    assert avg.grid == (16, 24)
    torch.testing.assert_close(avg.self_attn, (parts[0] + parts[1] + parts[2]) / 3, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="share one grid"):
        AttentionCapture(sd2.unet, (), (11, 13))


def test_gradients_flow_to_text_embeddings(sd2, sd2_inputs):
    """d/d(emb) of a captured probability and a captured logit, checked against a
    central finite difference on a float64 copy of the UNet."""
    import copy

    unet = copy.deepcopy(sd2.unet).double()
    z_t, emb = (t.double() for t in sd2_inputs)

    def f(e):
        with AttentionCapture(unet, (7,), (), cross_logits_tokens=[3]) as cap:
            maps = cap.run(z_t, T, e)
        return maps.cross[7][..., 3].sum() + 0.1 * maps.cross_logits[7].sum()

    e = emb.clone().requires_grad_(True)
    with torch.enable_grad():
        f(e).backward()
    grad = e.grad
    assert torch.isfinite(grad).all() and grad[0, 3].abs().sum() > 0
    v = torch.randn(emb.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = 1e-4
    with torch.no_grad():
        numeric = (f(emb + h * v) - f(emb - h * v)) / (2 * h)
    torch.testing.assert_close((grad * v).sum(), numeric, rtol=1e-5, atol=1e-8)


def test_unknown_layout_names_what_it_found():
    from diffusers import UNet2DConditionModel

    from text2mask.errors import ModelLoadError

    torch.manual_seed(0)
    xl_like = UNet2DConditionModel(  # SDXL's shape: 3 levels, several transformer layers per block
        sample_size=16, block_out_channels=(16, 16, 16), layers_per_block=2, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2), cross_attention_dim=16, attention_head_dim=4)
    with pytest.raises(ModelLoadError, match=r"found 11 transformer blocks.*2 transformer layer"):
        AttentionCapture(xl_like)


def custom_diffusion_processors(unet, blocks, train_q_out, seed=0):
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

    g = torch.Generator().manual_seed(seed)
    procs = {}
    for b in blocks:
        attn = attn_of(unet, b, "attn2")
        p = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=train_q_out,
                                            hidden_size=attn.to_q.out_features,
                                            cross_attention_dim=attn.to_k.in_features)
        with torch.no_grad():
            for prm in p.parameters():
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.2)
        procs[f"{TABLE[b][0]}.transformer_blocks.0.attn2.processor"] = p
    return procs


@pytest.mark.parametrize("train_q_out", [False, True])
def test_custom_diffusion_processor_is_honoured(sd, inputs, train_q_out):
    from text2mask.modeling.capture import swap_processors

    z_t, emb = inputs
    procs = custom_diffusion_processors(sd.unet, (4, 5, 6, 7, 8), train_q_out)
    with torch.no_grad(), swap_processors(sd.unet, procs):
        plain = sd.unet(z_t, T, encoder_hidden_states=emb).sample

        def run():
            with AttentionCapture(sd.unet, stop_early=False) as cap:
                return cap.run(z_t, T, emb)

        maps, grabbed = grab_all(sd.unet, [(6, "attn2")], run)
    torch.testing.assert_close(maps.output, plain, rtol=0, atol=1e-5)
    x, context = grabbed[(6, "attn2")]
    p = procs[f"{TABLE[6][0]}.transformer_blocks.0.attn2.processor"]
    attn = attn_of(sd.unet, 6, "attn2")
    with torch.no_grad():
        q = (p.to_q_custom_diffusion if train_q_out else attn.to_q)(x).double()
        k = p.to_k_custom_diffusion(context).double()
    hd = q.shape[-1] // attn.heads
    q = q.view(1, -1, attn.heads, hd).transpose(1, 2)
    k = k.view(1, -1, attn.heads, hd).transpose(1, 2)
    expected = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1).mean(dim=1)
    torch.testing.assert_close(maps.cross[6].reshape(1, -1, 77).double(), expected, rtol=0, atol=1e-5)
    assert all(sd.unet.attn_processors[k] is not v for k, v in procs.items())  # restored


def test_unknown_processor_is_refused_by_name(sd):
    from text2mask.modeling.capture import swap_processors

    class ForeignProcessor:
        def __call__(self, attn, hidden_states, **kwargs):
            raise AssertionError("never called")

    key = f"{TABLE[11][0]}.transformer_blocks.0.attn1.processor"
    with swap_processors(sd.unet, {key: ForeignProcessor()}):
        with pytest.raises(NotImplementedError, match=r"ForeignProcessor of up_blocks\.2\.attentions\.1"):
            with AttentionCapture(sd.unet):
                pass
    with pytest.raises(KeyError, match="no attention layer"):
        with swap_processors(sd.unet, {"nowhere.processor": ForeignProcessor()}):
            pass
