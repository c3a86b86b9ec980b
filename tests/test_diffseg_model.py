"""DiffSeg on the tiny random Kandinsky-2.2-layout model at 128² (latent 16², grids 8, 4, 2):
SCM's zero start and its reach, shots, order and batching, one episode overfitting, and
the checkpoint round trip. The masks are MEANINGLESS; the mechanics are what is tested."""
import copy
import json

import numpy as np
import pytest
import torch

from text2mask.errors import ModelLoadError
from text2mask.fewshot.diffseg.checkpoint import checkpoint_info, load_diffseg, save_diffseg
from text2mask.fewshot.diffseg.edges import EdgeDetector
from text2mask.fewshot.diffseg.model import DiffSeg, DiffSegConfig, DiffSegHeads
from text2mask.fewshot.model import episode_inputs
from text2mask.modeling import kandinsky
from text2mask.modeling.added_kv import AddedKVCapture
from tiny_kandinsky import RESOLUTION, make_tiny_kandinsky, perturb

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = DiffSegConfig(resolution=RESOLUTION)
UP_LAYERS = range(4, 10)         # forward indices of the up path's added-KV layers (the tiny model)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_kandinsky(tmp_path_factory.mktemp("kandinsky") / "model")


@pytest.fixture(scope="module")
def model(tiny_dir):
    """In float64: random networks amplify float32 rounding (minmax of nearly flat maps), and
    the equalities below are about the method, not the rounding."""
    base = kandinsky.load(str(tiny_dir), device="cpu", dtype="fp32")
    for m in (base.unet, base.movq, base.image_encoder):
        m.double()
    base.dtype = torch.float64
    torch.manual_seed(0)
    heads = perturb(DiffSegHeads(base.unet, 4, CONFIG), seed=1).double().eval().requires_grad_(False)
    return DiffSeg(base, heads, CONFIG, EdgeDetector())


def _fresh(model, seed=0):
    torch.manual_seed(seed)
    return DiffSegHeads(model.base.unet, 4, CONFIG).double()


def _photo(seed, h=90, w=120):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    mask = np.zeros((h, w), bool)
    mask[10 + seed % 7:60, 20:90 - seed % 5] = True
    return rgb, mask


def _episode(query, supports):
    return episode_inputs(_photo(query)[0], [_photo(s) for s in supports], RESOLUTION)


def _maps(model, feats, heads=None):
    """Per-layer cross maps of one forward, with ``heads``' SCM attached (or none)."""
    unet = model.base.unet
    from text2mask.fewshot.diffseg.stages import noised_latent

    z = noised_latent(feats.query_latent, model.alpha_bar, feats.noise)
    t = torch.full((z.shape[0],), CONFIG.timestep)
    with torch.no_grad():
        if heads is None:
            with AddedKVCapture(unet) as cap:
                return cap.run(z, t, feats.image_embeds)
        with heads.scm.attached(unet, feats.edges), AddedKVCapture(unet) as cap:
            return cap.run(z, t, feats.image_embeds)


def test_zero_initialised_scm_leaves_every_map_unchanged(model):
    feats = model.features([_episode(0, [1])])
    fresh = _fresh(model)
    plain, controlled = _maps(model, feats), _maps(model, feats, fresh)
    for a, b in zip(plain, controlled):
        assert torch.equal(a.cross, b.cross) and torch.equal(a.self_attn, b.self_attn)
    # a trained (here: perturbed) SCM moves the up path's maps only
    moved = _maps(model, feats, model.heads)
    for i, (a, b) in enumerate(zip(plain, moved)):
        same = torch.equal(a.cross, b.cross) and torch.equal(a.self_attn, b.self_attn)
        assert same == (i not in UP_LAYERS), a.layer.name


def test_gradients_reach_scm_and_never_the_frozen_unet(model):
    feats = model.features([_episode(2, [3])])
    heads = perturb(_fresh(model), seed=2).train()
    m_a, l_pre = heads(model.base.unet, feats, model.alpha_bar, CONFIG.timestep, None)
    ((m_a - 0.5) ** 2).mean().backward()
    assert all(p.grad is None for p in model.base.unet.parameters())
    assert not any(p.requires_grad for p in model.base.unet.parameters())
    scm_grads = {n: p.grad for n, p in heads.scm.named_parameters()}
    assert all(g is not None and g.abs().max() > 0 for n, g in scm_grads.items()), \
        [n for n, g in scm_grads.items() if g is None or g.abs().max() == 0]
    # a fresh SCM: its zero outputs get gradients (and through them, the rest after one step)
    fresh = _fresh(model).train()
    m_a, _ = fresh(model.base.unet, feats, model.alpha_bar, CONFIG.timestep, None)
    ((m_a - 0.5) ** 2).mean().backward()
    assert all(z.weight.grad.abs().max() > 0 for level in fresh.scm.zero for z in level)


def test_k_identical_supports_equal_one_shot_exactly(model):
    one = model.predict([_episode(4, [5])])[0]
    three = model.predict([_episode(4, [5, 5, 5])])[0]
    assert np.array_equal(one.score, three.score) and one.threshold == three.threshold


def test_support_order_does_not_matter(model):
    a = model.predict([_episode(6, [7, 8])])[0]
    b = model.predict([_episode(6, [8, 7])])[0]
    assert np.array_equal(a.score, b.score)


def test_batched_equals_apart(model):
    e1, e2 = _episode(9, [10]), _episode(11, [12])
    both = model.predict([e1, e2])
    for e, s in zip((e1, e2), both):
        np.testing.assert_allclose(model.predict([e])[0].score, s.score, atol=1e-6, rtol=0)
    assert not np.allclose(both[0].score, both[1].score)


def test_the_same_photo_gets_the_same_noise_in_any_batch(model):
    f = model.features([_episode(13, [14]), _episode(15, [14]), _episode(13, [16])])
    assert torch.equal(f.noise[0], f.noise[2]) and not torch.equal(f.noise[0], f.noise[1])


def test_one_episode_overfits(model, tiny_dir):
    """SGD (the paper's optimiser) on one fixed episode drives the loss far down."""
    from text2mask.fewshot.diffseg.stages import diffseg_loss, map_targets
    from text2mask.fewshot.diffews import mask_to_image, square_mask

    rgb, mask = _photo(17)
    e = episode_inputs(rgb, [_photo(18)], RESOLUTION)
    feats = model.features([e])
    m = square_mask(mask, RESOLUTION)[None]
    g, w = map_targets(m, torch.zeros_like(m), (16, 16))
    with torch.no_grad():
        gt = model.base.encode(mask_to_image(m)).float()
    heads = _fresh(model).train()
    opt = torch.optim.SGD(heads.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(15):
        m_a, l_pre = heads(model.base.unet, feats, model.alpha_bar, CONFIG.timestep, None)
        loss = diffseg_loss(m_a, l_pre, g, w, gt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.35 * losses[0], losses


def test_checkpoint_round_trip(model, tiny_dir, tmp_path):
    info = checkpoint_info(str(tiny_dir), None, model.base.info, CONFIG, model.edges, benchmark="pascal5i", fold=0,
                           training_classes=[6, 7], source="tests: perturbed random heads")
    heads = copy.deepcopy(model.heads).float()          # checkpoints hold float32 weights
    out = save_diffseg(tmp_path / "ckpt", heads, info)
    loaded = load_diffseg(out, device="cpu", dtype="fp32")
    for a, b in ((heads.scm, loaded.heads.scm), (heads.pam, loaded.heads.pam)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    assert loaded.config == CONFIG and loaded.base.info["random_weights"]
    e = _episode(19, [20])
    saved = DiffSeg(loaded.base, heads, CONFIG, EdgeDetector())
    assert np.array_equal(saved.predict([e])[0].score, loaded.predict([e])[0].score)
    doc = json.loads((out / "fewshot.json").read_text())
    assert doc["method"] == "diffseg" and doc["edges"]["detector"] == "canny" and doc["scm"]["width"] == 256
    # the shared reader dispatches on the method and validates DiffSeg's fields
    from text2mask.fewshot.checkpoint import read_info

    assert read_info(out)["method"] == "diffseg"
    for field, value, message in (("config", {**doc["config"], "threshold": "high"}, "field 'config'"),
                                  ("edges", {"detector": "sobel"}, "edges.detector"),
                                  ("fold", 7, "field 'fold'")):
        (out / "fewshot.json").write_text(json.dumps({**doc, field: value}))
        with pytest.raises(ModelLoadError, match=message):
            read_info(out)
    (out / "fewshot.json").write_text(json.dumps(doc))
    nan = {k: v.clone() for k, v in model.heads.pam.state_dict().items()}
    nan["head.2.bias"][0] = float("nan")
    from safetensors.torch import save_file

    save_file(nan, str(out / "pam.safetensors"))
    with pytest.raises(ModelLoadError, match="non-finite"):
        load_diffseg(out, device="cpu", dtype="fp32")
