"""DiffewS model side: KV fusion against float64 hand computation, its invariants, the
support conv's initialisation, the one-step rule, mask decoding and thresholds."""
import copy

import numpy as np
import pytest
import torch

from text2mask.fewshot.diffews import (
    DiffewsUNet, KVFusionProcessor, KVStore, MaskScores, mask_image_uint8, mask_scores, mask_to_image,
    self_attention_keys, square_mask, support_conv_in,
)
from text2mask.modeling.capture import transformer_blocks


@pytest.fixture(scope="module")
def unet64(sd2):
    """The tiny SD2 UNet in float64 (a copy: the session model stays untouched)."""
    return copy.deepcopy(sd2.unet).double()


@pytest.fixture(scope="module")
def net(sd2):
    unet = copy.deepcopy(sd2.unet)
    return DiffewsUNet(unet, support_conv_in(unet.conv_in)).eval()


def _attn1(unet, block: int):
    b = transformer_blocks(unet)[block]
    return unet.get_submodule(b.name).transformer_blocks[0].attn1


def _hand(attn, x: np.ndarray, supports: list[np.ndarray]) -> np.ndarray:
    """softmax(Q [K_q; K_1..K_k]^T / sqrt(d)) [V_q; V_1..V_k] per head, then to_out, in float64 numpy."""
    w = {n: getattr(attn, n).weight.detach().numpy() for n in ("to_q", "to_k", "to_v")}
    bias = {n: getattr(attn, n).bias for n in ("to_q", "to_k", "to_v")}
    lin = lambda n, a: a @ w[n].T + (0 if bias[n] is None else bias[n].detach().numpy())  # noqa: E731
    tokens = np.concatenate([x] + supports, axis=0)
    q, k, v = lin("to_q", x), lin("to_k", tokens), lin("to_v", tokens)
    h = attn.heads
    d = q.shape[1] // h
    heads = []
    for j in range(h):
        s = q[:, j * d:(j + 1) * d] @ k[:, j * d:(j + 1) * d].T / np.sqrt(d)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        heads.append(p @ v[:, j * d:(j + 1) * d])
    out = np.concatenate(heads, axis=1)
    return out @ attn.to_out[0].weight.detach().numpy().T + attn.to_out[0].bias.detach().numpy()


def _run(attn, store, key, x: torch.Tensor) -> torch.Tensor:
    return KVFusionProcessor(store, key)(attn, x)


@pytest.mark.parametrize("shots", [0, 1, 3])
@pytest.mark.parametrize("block", [0, 7, 15])
def test_kv_fusion_equals_float64_hand_computation(unet64, shots, block):
    attn = _attn1(unet64, block)
    c = attn.to_q.in_features
    g = torch.Generator().manual_seed(shots * 100 + block)
    x = torch.randn(1, 12, c, generator=g, dtype=torch.float64)
    supports = torch.randn(shots, 12, c, generator=g, dtype=torch.float64)
    store = KVStore(shots)
    if shots:
        store.recording = True
        plain_supports = _run(attn, store, "k", supports)
        store.recording = False
        # the support pass itself is plain self-attention of each support
        for i in range(shots):
            np.testing.assert_allclose(plain_supports[i].numpy(), _hand(attn, supports[i].numpy(), []),
                                       rtol=0, atol=1e-12)
    out = _run(attn, store, "k", x)
    expected = _hand(attn, x[0].numpy(), [s.numpy() for s in supports])
    np.testing.assert_allclose(out[0].detach().numpy(), expected, rtol=0, atol=1e-12)
    assert len(store) == 0


def test_support_equal_to_query_gives_plain_self_attention(unet64):
    attn = _attn1(unet64, 4)
    x = torch.randn(2, 10, attn.to_q.in_features, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    store = KVStore(1)
    store.recording = True
    plain = _run(attn, store, "k", x)
    store.recording = False
    fused = _run(attn, store, "k", x)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-12)


def _inputs(seed: int, episodes: int, shots: int, hw: int = 8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(episodes, 4, hw, hw, generator=g), torch.randn(episodes * shots, 8, hw, hw, generator=g))


@pytest.fixture(scope="module")
def text(sd2):
    from text2mask.fewshot.model import empty_text

    with torch.no_grad():
        return empty_text(sd2, "unpadded")


def test_whole_unet_with_support_equal_to_query_is_the_plain_unet(net, text):
    """conv_in_ref(z ⊕ z) = conv_in(z) at initialisation, so the support pass sees the
    query's hidden states in every block and the fused attention reduces to plain."""
    z, _ = _inputs(3, 1, 1)
    with torch.no_grad():
        fused = net(z, torch.cat([z, z], dim=1), 1, text)
        plain = -net.unet(z, 1, encoder_hidden_states=text).sample
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_support_order_does_not_matter(net, text):
    z, s = _inputs(4, 1, 3)
    with torch.no_grad():
        a = net(z, s, 3, text)
        b = net(z, s[[2, 0, 1]], 3, text)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_two_episodes_batched_equal_run_apart(net, text):
    z, s = _inputs(5, 2, 2)
    with torch.no_grad():
        both = net(z, s, 2, text)
        first = net(z[:1], s[:2], 2, text)
        second = net(z[1:], s[2:], 2, text)
    torch.testing.assert_close(both, torch.cat([first, second]), rtol=1e-5, atol=1e-5)


def test_store_cleared_and_processors_restored_per_episode(net, text):
    before = {k: type(p) for k, p in net.unet.attn_processors.items()}
    za, sa = _inputs(6, 1, 2)
    zb, sb = _inputs(7, 1, 1)
    with torch.no_grad():
        fresh_b = net(zb, sb, 1, text)
        net(za, sa, 2, text)
        after_a_b = net(zb, sb, 1, text)
    torch.testing.assert_close(after_a_b, fresh_b, rtol=0, atol=0)
    assert {k: type(p) for k, p in net.unet.attn_processors.items()} == before
    assert len(self_attention_keys(net.unet)) == 16


def test_store_refuses_query_pass_without_support_pass():
    with pytest.raises(RuntimeError, match="support pass"):
        KVStore(1).take("down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor")


def test_support_conv_initialisation_identity(unet64):
    ref = support_conv_in(unet64.conv_in)
    assert (ref.in_channels, ref.out_channels) == (8, unet64.conv_in.out_channels)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(ref(torch.cat([z, z], dim=1)), unet64.conv_in(z), rtol=0, atol=1e-12)
    torch.testing.assert_close(ref.bias, unet64.conv_in.bias, rtol=0, atol=0)


# The released scheduler_1.0_1.0/scheduler_config.json of aim-uofa/DiffewS (d12c396).
RELEASED_SCHEDULER = dict(
    beta_start=1.0, beta_end=1.0, beta_schedule="scaled_linear", clip_sample=False, clip_sample_range=1.0,
    num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=False,
    set_alpha_to_one=False, steps_offset=1, thresholding=False, timestep_spacing="leading",
)


def test_one_step_rule_matches_ddim_with_the_released_config():
    """With ᾱ_t = 0, DDIM's x̂0 = √ᾱ·x − √(1−ᾱ)·v is −v: the mask latent is −UNet output."""
    from diffusers import DDIMScheduler

    from text2mask.fewshot.diffews import TIMESTEP

    sched = DDIMScheduler(**RELEASED_SCHEDULER)
    sched.set_timesteps(1)
    assert sched.timesteps.tolist() == [TIMESTEP]
    g = torch.Generator().manual_seed(0)
    v, x = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    x0 = sched.step(v, TIMESTEP, x).pred_original_sample
    torch.testing.assert_close(x0, -v, rtol=0, atol=0)


def test_mask_image_conversion_on_hand_values():
    decoded = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    u8 = mask_image_uint8(decoded)
    # (x/2 + 1/2)·255 truncated: 0, 0, 127 (127.5), 191 (191.25), 255, 255
    assert u8[0, 0, 0].tolist() == [0, 0, 127, 191, 255, 255]
    m = mask_to_image(torch.tensor([[True, False]]))
    assert m.shape == (3, 1, 2) and m[:, 0, 0].tolist() == [1, 1, 1] and m[:, 0, 1].tolist() == [-1, -1, -1]


def test_relative_threshold_on_hand_arrays():
    rgb = np.zeros((1, 3, 2, 2), np.uint8)
    rgb[0, :, 0, 0] = (200, 100, 0)     # mean 100, channel max 200 -> threshold 0.25·200 = 50
    rgb[0, :, 0, 1] = (60, 40, 50)      # mean 50: not above 50
    rgb[0, :, 1, 0] = (60, 45, 50)      # mean 51.67: kept
    s = mask_scores(torch.from_numpy(rgb))[0]
    assert s.threshold == pytest.approx(0.25 * 200 / 255)
    assert s.mask().tolist() == [[True, False], [True, False]]
    empty = mask_scores(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))[0]
    assert empty.threshold == 0.0 and not empty.mask().any() and not empty.mask((7, 5)).any()


def test_soft_map_is_resized_before_thresholding():
    """A 2x2 score upsampled bilinearly to 4x4 keeps the pixels whose interpolated score
    passes the threshold, which a nearest upsampling of the 2x2 mask would not give."""
    score = np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)
    s = MaskScores(score, threshold=0.3)
    m = s.mask((4, 4))
    up = torch.nn.functional.interpolate(torch.from_numpy(score)[None, None], size=(4, 4), mode="bilinear",
                                         align_corners=False, antialias=True)[0, 0].numpy()
    assert m.tolist() == (up > 0.3).tolist()
    assert m.sum() == 4 and m[0, 0] and m[1, 1] and not m[2, 2]


def test_support_mask_nearest_resize():
    mask = np.zeros((4, 6), bool)
    mask[:2, :3] = True
    sq = square_mask(mask, 12)
    assert sq.shape == (12, 12) and sq[:6, :6].all() and not sq[6:].any() and not sq[:, 6:].any()
