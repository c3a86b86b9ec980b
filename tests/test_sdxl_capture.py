"""Attention capture and text conditioning on the tiny SDXL layout (issue 24).

The layout: 11 transformer blocks, 2 or 3 transformer layers each (SDXL base: 2 or 10),
2 heads at latent/2 and 4 at /4. Maps are checked against softmax(QK^T / sqrt(d)) per head
count, recomputed from every layer's own to_q / to_k on the input it really received; the
conditioning against diffusers' own StableDiffusionXLPipeline.
"""
import math

import pytest
import torch

from text2mask.modeling import sdxl as X
from text2mask.modeling.capture import AttentionCapture, transformer_blocks

PROMPT = "a photo including horse, person with clothes, tree, river, and rocks."
T = torch.tensor(150)
TABLE = [  # forward order: (diffusers module, latent factor, transformer layers, heads)
    ("down_blocks.1.attentions.0", 2, 2, 2), ("down_blocks.1.attentions.1", 2, 2, 2),
    ("down_blocks.2.attentions.0", 4, 3, 4), ("down_blocks.2.attentions.1", 4, 3, 4),
    ("mid_block.attentions.0", 4, 3, 4),
    ("up_blocks.0.attentions.0", 4, 3, 4), ("up_blocks.0.attentions.1", 4, 3, 4),
    ("up_blocks.0.attentions.2", 4, 3, 4),
    ("up_blocks.1.attentions.0", 2, 2, 2), ("up_blocks.1.attentions.1", 2, 2, 2),
    ("up_blocks.1.attentions.2", 2, 2, 2),
]
LH, LW = 16, 24   # latent (grids 8x12 at /2, 4x6 at /4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(sdxl):
    """A random latent, one prompt's conditioning and its added_cond_kwargs."""
    z = torch.randn((1, 4, LH, LW), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cond = sdxl.encode_prompt(PROMPT)
    added = sdxl.added_conditions(cond.pooled[None], (8 * LH, 8 * LW))
    return z, cond.hidden[None], added


def layer(unet, block, i, kind):
    return getattr(unet.get_submodule(TABLE[block][0]).transformer_blocks[i], kind)


def softmax_maps(attn, x, context):
    """softmax(QK^T / sqrt(d)) averaged over the layer's heads, in float64."""
    q, k = attn.to_q(x).double(), attn.to_k(context).double()
    b, n, _ = q.shape
    d = q.shape[-1] // attn.heads
    q = q.view(b, n, attn.heads, d).transpose(1, 2)
    k = k.view(b, k.shape[1], attn.heads, d).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1).mean(dim=1)


def grab_inputs(modules, run):
    """(hidden_states, encoder_hidden_states) each module received during run()."""
    store = {id(m): [] for m in modules}

    def hook(mod, args, kwargs):
        store[id(mod)].append(((args[0] if args else kwargs["hidden_states"]).detach().clone(),
                               kwargs.get("encoder_hidden_states")))
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    return result, [store[id(m)] for m in modules]


def test_block_table_of_the_sdxl_layout(sdxl):
    blocks = transformer_blocks(sdxl.unet)
    assert [(b.name, b.factor, b.layers) for b in blocks] == [t[:3] for t in TABLE]
    for b, (*_, heads) in zip(blocks, TABLE):
        layers = sdxl.unet.get_submodule(b.name).transformer_blocks
        assert all(t.attn1.heads == t.attn2.heads == heads and t.attn2.is_cross_attention for t in layers)
    # The default: the paper's places translated (sdxl.LAYOUT's comment, docs/sdxl.md).
    assert sdxl.spec.layout is X.LAYOUT
    assert [TABLE[i][0] for i in X.LAYOUT.cross_blocks] == [
        "down_blocks.2.attentions.0", "down_blocks.2.attentions.1", "mid_block.attentions.0",
        "up_blocks.0.attentions.0", "up_blocks.0.attentions.1"]
    assert [TABLE[i][0] for i in X.LAYOUT.self_blocks] == ["up_blocks.1.attentions.1"]


def test_blocks_run_in_forward_order_at_their_grids(sdxl, inputs):
    z, hidden, added = inputs
    modules = [sdxl.unet.get_submodule(name) for name, *_ in TABLE]
    with torch.no_grad():
        _, seen = grab_inputs(modules, lambda: sdxl.unet(z, T, encoder_hidden_states=hidden,
                                                          added_cond_kwargs=added))
    assert [tuple(s[0][0].shape[-2:]) for s in seen] == [(LH // f, LW // f) for _, f, *_ in TABLE]


@pytest.mark.parametrize("block, kind", [(0, "attn2"), (2, "attn2"), (4, "attn2"), (6, "attn2"),
                                         (9, "attn1"), (3, "attn1")])
def test_capture_equals_softmax_per_head_count_averaged_over_layers(sdxl, inputs, block, kind):
    z, hidden, added = inputs
    cross, selfb = ((block,), ()) if kind == "attn2" else ((), (block,))
    n_layers, heads = TABLE[block][2], TABLE[block][3]
    attns = [layer(sdxl.unet, block, i, kind) for i in range(n_layers)]

    def run():
        with torch.no_grad(), AttentionCapture(sdxl.unet, cross, selfb) as cap:
            return cap.run(z, T, hidden, added)

    maps, grabbed = grab_inputs(attns, run)
    expected = []
    for attn, g in zip(attns, grabbed):
        assert len(g) == 1 and attn.heads == heads
        x, context = g[0]
        if kind == "attn2":
            assert torch.equal(context, hidden)
        with torch.no_grad():
            expected.append(softmax_maps(attn, x, x if context is None else context))
    per_layer, expected = expected, torch.stack(expected).mean(dim=0)
    f = TABLE[block][1]
    h, w = LH // f, LW // f
    if kind == "attn2":
        got = maps.cross[block]
        assert tuple(got.shape) == (1, h, w, 77)
        got = got.reshape(1, h * w, 77)
    else:
        assert maps.grid == (h, w)
        got = maps.self_attn
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
    # every layer's own map is far from the mean: the capture averages them all
    assert all((got.double() - m).abs().max() > 1e-4 for m in per_layer)
    assert torch.sum(got.double()[0], dim=-1).sub(1).abs().max() < 1e-5


def test_default_pass_stops_after_the_last_self_layer(sdxl, inputs):
    z, hidden, added = inputs
    unet, fired = sdxl.unet, {}
    watched = {
        "block 9 layer 1 attn1": layer(unet, 9, 1, "attn1"),
        "block 9 layer 1 attn2": layer(unet, 9, 1, "attn2"),
        "block 10": unet.get_submodule(TABLE[10][0]),
        "up_blocks.2": unet.up_blocks[2],
        "conv_out": unet.conv_out,
    }
    handles = [m.register_forward_pre_hook(lambda mod, args, n=name: fired.__setitem__(n, fired.get(n, 0) + 1))
               for name, m in watched.items()]
    try:
        with torch.no_grad(), AttentionCapture(unet, X.LAYOUT.cross_blocks, X.LAYOUT.self_blocks) as cap:
            maps = cap.run(z, T, hidden, added)
    finally:
        for h in handles:
            h.remove()
    assert fired == {"block 9 layer 1 attn1": 1}
    assert sorted(maps.cross) == [2, 3, 4, 5, 6] and maps.grid == (LH // 2, LW // 2)
    assert tuple(maps.self_attn.shape) == (1, (LH // 2) * (LW // 2), (LH // 2) * (LW // 2))


def test_full_pass_output_equals_plain_unet(sdxl, inputs):
    z, hidden, added = inputs
    with torch.no_grad():
        plain = sdxl.unet(z, T, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
        with AttentionCapture(sdxl.unet, (0, 2, 4, 6, 8), (9, 10), stop_early=False) as cap:
            maps = cap.run(z, T, hidden, added)
    torch.testing.assert_close(maps.output, plain, rtol=0, atol=1e-5)
    assert (plain.abs() > 1e-3).any()


def test_time_ids_and_pooled_embedding_reach_the_maps(sdxl, inputs):
    """The added conditioning enters the time embedding, hence every block's input."""
    z, hidden, added = inputs
    other = {"text_embeds": added["text_embeds"], "time_ids": X.time_ids((512, 512), 1, torch.float32, "cpu")}
    with torch.no_grad(), AttentionCapture(sdxl.unet, (2,), (9,)) as cap:
        a, b = cap.run(z, T, hidden, added), cap.run(z, T, hidden, other)
    assert (a.cross[2] - b.cross[2]).abs().max() > 1e-6


def test_conditioning_equals_diffusers_sdxl_pipeline(sdxl):
    """hidden = both encoders' penultimate states, pooled = text_embeds, time ids =
    (H, W, 0, 0, H, W): diffusers' encode_prompt and _get_add_time_ids on the same modules."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(vae=sdxl.vae, text_encoder=sdxl.text_encoder,
                                     text_encoder_2=sdxl.text_encoder_2, tokenizer=sdxl.tokenizer,
                                     tokenizer_2=sdxl.tokenizer_2, unet=sdxl.unet, scheduler=sdxl.scheduler,
                                     add_watermarker=False)
    with torch.no_grad():
        ours = sdxl.encode_prompt(PROMPT)
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    assert tuple(ours.hidden.shape) == (77, 32 + 48) and tuple(ours.pooled.shape) == (16,)
    assert torch.equal(ours.hidden, embeds[0]) and torch.equal(ours.pooled, pooled[0])
    ids = pipe._get_add_time_ids((768, 1024), (0, 0), (768, 1024), torch.float32,
                                 text_encoder_projection_dim=sdxl.text_encoder_2.config.projection_dim)
    added = sdxl.added_conditions(torch.stack([ours.pooled] * 3), (768, 1024))
    assert torch.equal(added["time_ids"], ids.repeat(3, 1)) and added["time_ids"].tolist()[0] == [
        768, 1024, 0, 0, 768, 1024]
    assert torch.equal(added["text_embeds"], torch.stack([pooled[0]] * 3))
