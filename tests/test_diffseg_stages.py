"""DiffSeg's pure stages against independent computations and hand cases: the low-cost
map fusion, minmax, PAM's position codes, the loss and its targets, edge maps, the
learning-rate schedule and the epoch order."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from text2mask.errors import ConfigError, ModelLoadError
from text2mask.fewshot.diffseg import edges as E
from text2mask.fewshot.diffseg.pam import PerceptualAttention
from text2mask.fewshot.diffseg.stages import (decoded_scores, diffseg_loss, fuse_maps, interpolation_matrix,
                                              map_targets, minmax, shot_mean)

D = torch.float64


def _upsampling_matrix(size, grid):
    """U (size² × grid²): F.interpolate (bilinear, align_corners=False) of every basis image."""
    basis = torch.eye(grid * grid, dtype=D).view(grid * grid, 1, grid, grid)
    return F.interpolate(basis, size=(size, size), mode="bilinear", align_corners=False).view(grid * grid, -1).T


def _explicit(cross, selfs, size):
    """DIFFSEG.md stage 5 as written: (H·W)² matrices built."""
    ups = [_upsampling_matrix(size, c.shape[-1]) for c in cross]
    m_cross = sum(u @ c.flatten(1).T for u, c in zip(ups, cross)).T / len(cross)               # (B, HW)
    out = []
    for b in range(cross[0].shape[0]):
        m_self = 0
        for u, s in zip(ups, selfs):
            key_up = s[b] @ u.T                                                                  # (g², HW)
            m_self = m_self + u @ (key_up / key_up.sum(1, keepdim=True))                         # (HW, HW)
        out.append((m_self / len(selfs)) @ m_cross[b])
    m = torch.stack(out)
    lo, hi = m.min(1, keepdim=True).values, m.max(1, keepdim=True).values
    return ((m - lo) / (hi - lo)).view(-1, 1, size, size)


def _row_stochastic(b, n, g):
    x = torch.rand(b, n, n, generator=g, dtype=D) ** 3
    return x / x.sum(-1, keepdim=True)


def test_interpolation_matrix_is_bilinear_upsampling():
    x = torch.randn(3, 1, 4, 4, dtype=D)
    a = interpolation_matrix(12, 4)
    want = F.interpolate(x, size=(12, 12), mode="bilinear", align_corners=False)
    assert torch.allclose(a @ x[:, 0] @ a.T, want[:, 0], atol=1e-14)


def test_low_cost_fusion_equals_the_explicit_construction():
    g = torch.Generator().manual_seed(0)
    grids = (3, 6, 2, 6)
    cross = [torch.rand(2, k, k, generator=g, dtype=D) for k in grids]
    selfs = [_row_stochastic(2, k * k, g) for k in grids]
    got = fuse_maps(cross, selfs, (6, 6))
    want = _explicit(cross, selfs, 6)
    assert got.shape == (2, 1, 6, 6)
    assert (got - want).abs().max() <= 1e-12


def test_identity_self_map_gives_minmax_of_the_cross_map():
    c = torch.rand(2, 5, 5, dtype=D)
    got = fuse_maps([c], [torch.eye(25, dtype=D).expand(2, 25, 25)], (5, 5))
    assert torch.allclose(got[:, 0], minmax(c), atol=1e-14)
    assert got.amin() == 0 and got.amax() == 1


def test_uniform_self_map_or_constant_cross_map_give_zero_not_nan():
    g = torch.Generator().manual_seed(1)
    c = torch.rand(2, 4, 4, generator=g, dtype=D)
    uniform = torch.full((2, 16, 16), 1 / 16, dtype=D)
    assert torch.equal(fuse_maps([c], [uniform], (8, 8)), torch.zeros(2, 1, 8, 8, dtype=D))
    const = torch.full((2, 4, 4), 0.3, dtype=D)
    out = fuse_maps([const], [_row_stochastic(2, 16, g)], (8, 8))
    assert torch.equal(out, torch.zeros_like(out))
    out32 = fuse_maps([const.float()], [_row_stochastic(2, 16, g).float()], (8, 8))
    assert torch.isfinite(out32).all() and out32.abs().max() == 0


def test_shot_mean_of_identical_rows_is_exact():
    x = torch.randn(2, 4, 3, 3)
    rep = x.repeat_interleave(5, dim=0)
    assert torch.equal(shot_mean(rep, 5), x)
    with pytest.raises(ValueError):
        shot_mean(rep, 3)


def _pam(positions, seed=0):
    torch.manual_seed(seed)
    return PerceptualAttention(4, 16, positions).double()


def test_pam_without_position_codes_cannot_see_where_the_map_is():
    g = torch.Generator().manual_seed(2)
    lq, ls, ma = (torch.randn(1, c, 4, 4, generator=g, dtype=D) for c in (4, 4, 1))
    perm = torch.randperm(16, generator=g)
    ma_perm = ma.flatten(2)[..., perm].view_as(ma)
    blind = _pam(False)
    assert (blind(lq, ls, ma) - blind(lq, ls, ma_perm)).abs().max() <= 1e-12
    seeing = _pam(True)
    assert (seeing(lq, ls, ma) - seeing(lq, ls, ma_perm)).abs().max() > 1e-6     # 10⁶ × the invariance bound


def test_pam_batched_equals_apart_and_every_parameter_learns():
    g = torch.Generator().manual_seed(3)
    lq, ls, ma = (torch.randn(2, c, 4, 4, generator=g, dtype=D) for c in (4, 4, 1))
    pam = _pam(True)
    both = pam(lq, ls, ma)
    for i in range(2):
        assert (both[i:i + 1] - pam(lq[i:i + 1], ls[i:i + 1], ma[i:i + 1])).abs().max() <= 1e-12
    (both ** 2).sum().backward()
    dead = [n for n, p in pam.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert dead == []


def test_targets_and_loss_on_hand_arrays():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    ignore = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, :4, :4] = True                     # top-left cell: all object
    mask[0, :4, 4:6] = True                    # top-right: half object, half ignore
    ignore[0, :4, 6:] = True
    ignore[0, 4:, 4:] = True                   # bottom-right: all ignore
    g, w = map_targets(mask, ignore, (2, 2))
    assert g[0, 0].tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert w[0, 0].tolist() == [[1.0, 0.5], [1.0, 0.0]]
    m_a = torch.tensor([[[[0.5, 0.0], [0.25, 1.0]]]])
    l_pre, l_gt = torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2)
    # map term: (1·0.25 + 0.5·1 + 1·0.0625 + 0·1) / 2.5; the all-ignore cell counts for nothing
    want = 2 * (0.25 + 0.5 + 0.0625) / 2.5 + 1.0
    assert diffseg_loss(m_a, l_pre, g, w, l_gt).item() == pytest.approx(want, abs=1e-7)


def test_decoded_scores_thresholds():
    img = torch.full((1, 3, 4, 4), -1.0)
    img[..., :2] = 1.0
    img[:, 0, 0, 3] = 5.0                      # clipped to 1 before averaging
    s = decoded_scores(img, 0.5)[0]
    assert s.threshold == 0.5 and s.mask()[:, :2].all() and not s.mask()[:, 2:].any()
    assert s.score[0, 3] == pytest.approx(1 / 3)
    rel = decoded_scores(img * 0.2, 0.5, "relative")[0]
    assert rel.threshold == pytest.approx(0.5 * 0.6) and rel.mask()[:, :2].all()


def test_canny_marks_only_the_boundary_of_a_drawn_square():
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[16:48, 16:48] = 255
    edges = E.canny(rgb)
    ys, xs = np.nonzero(edges)
    assert len(ys) > 4 * 28
    dist = np.minimum.reduce([np.abs(ys - 16), np.abs(ys - 47), np.abs(xs - 16), np.abs(xs - 47)])
    inside = (ys >= 15) & (ys <= 48) & (xs >= 15) & (xs <= 48)
    assert (dist <= 1).all() and inside.all()
    assert set(np.unique(edges)) == {0, 255}


def test_hed_loads_controlnet_hed_key_names(tmp_path):
    torch.manual_seed(0)
    names = {k: v.shape for k, v in E.HED().state_dict().items()}
    assert "norm" in names and "block1.convs.0.weight" in names and "block5.projection.bias" in names
    assert names["block3.convs.2.weight"] == (256, 256, 3, 3) and len(names) == 1 + 2 * (13 + 5)
    state = {k: torch.randn(s) * 0.05 for k, s in names.items()}
    f = tmp_path / "ControlNetHED.pth"
    torch.save(state, f)
    det = E.EdgeDetector("hed", f)
    assert torch.equal(det._hed.block2.convs[1].weight, state["block2.convs.1.weight"])
    out = det(np.full((32, 32, 3), 128, np.uint8))
    assert out.shape == (32, 32) and out.dtype == np.uint8
    assert det.describe()["sha256"] and det.describe()["detector"] == "hed"
    bad = dict(state)
    bad["block9.weight"] = bad.pop("norm")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ModelLoadError, match="not ControlNetHED weights"):
        E.load_hed(tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match="--hed"):
        E.EdgeDetector("hed")


def test_epoch_lr_is_steplr_and_epochs_visit_every_pair():
    from text2mask.fewshot.diffseg.train import DiffSegTrainConfig, epoch_batches, epoch_lr

    cfg = DiffSegTrainConfig(epochs=60, lr=0.01, lr_step_epochs=20, lr_gamma=0.9)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, 20, 0.9)
    for epoch in range(60):
        assert epoch_lr(cfg, epoch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        sched.step()
    steps = epoch_batches(10, 42, 3, world=2, batch=2)
    assert len(steps) == 3 and all(len(r) == 2 and all(len(b) == 2 for b in r) for r in steps)
    seen = [i for s in steps for r in s for i in r]
    assert set(seen) == set(range(10)) and len(seen) == 12       # wrapped round to whole steps
    assert epoch_batches(10, 42, 3, 2, 2) == steps and epoch_batches(10, 42, 4, 2, 2) != steps


def test_mean_and_std_over_seeds_per_fold():
    from text2mask.errors import InputError
    from text2mask.fewshot.diffseg.seeds import seed_groups

    rows = [{"benchmark": "pascal5i", "shots": 1, "fold": f, "mIoU": v, "FB-IoU": v + 10}
            for f, v in ((0, 60.0), (0, 64.0), (0, 62.0), (1, 50.0))]
    groups = seed_groups([0, 1, 2, 0], rows)[("pascal5i", 1)]
    assert groups[0]["seeds"] == [0, 1, 2] and groups[0]["mIoU"] == (62.0, 2.0) and groups[0]["FB-IoU"] == (72.0, 2.0)
    assert groups[1]["mIoU"] == (50.0, 0.0)
    with pytest.raises(InputError, match="seed 1"):
        seed_groups([0, 1, 1, 0], rows)
