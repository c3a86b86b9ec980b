"""SLiMe maps and losses against hand computations (float64 loops, small tensors)."""
import math

import numpy as np
import pytest
import torch

from text2mask.slime import losses as L
from text2mask.slime import maps as M


def row_stochastic(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, n, generator=g, dtype=torch.float64).softmax(dim=1)


def test_was_is_self_attention_times_cross_and_sums_to_one():
    h, w, k = 3, 4, 3
    a = row_stochastic(h * w, 0)
    logits = torch.randn(k, h, w, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    c = M.k_way_softmax(logits)
    out = M.was(a, c)
    # independent: loop over query pixels and key pixels
    expected = np.zeros((k, h, w))
    cn, an = c.numpy(), a.numpy()
    for kk in range(k):
        for q in range(h * w):
            expected[kk, q // w, q % w] = sum(an[q, j] * cn[kk, j // w, j % w] for j in range(h * w))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(out.sum(dim=0).numpy(), np.ones((h, w)), rtol=1e-12)


def test_was_rejects_a_grid_of_another_size():
    with pytest.raises(ValueError, match="does not match"):
        M.was(row_stochastic(6, 0), torch.zeros(2, 2, 2, dtype=torch.float64))


def test_training_cross_resizes_then_averages_layers_and_softmax_is_k_way():
    # Layer 1 already on the 4x4 grid; layer 2 on 2x2, upsampled bilinearly (align_corners=False).
    l1 = torch.arange(4 * 4 * 2, dtype=torch.float32).reshape(4, 4, 2) / 10
    l2 = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[4.0, 5.0], [6.0, 7.0]]])
    out = M.training_cross([l1, l2], (4, 4))
    # align_corners=False 2 -> 4: source coordinate (i + 0.5) / 2 - 0.5, clamped to [0, 1]
    def up(m):
        r = np.zeros((4, 4))
        for i in range(4):
            for j in range(4):
                y = min(max((i + 0.5) / 2 - 0.5, 0), 1)
                x = min(max((j + 0.5) / 2 - 0.5, 0), 1)
                y0, x0 = int(math.floor(y)), int(math.floor(x))
                y1, x1 = min(y0 + 1, 1), min(x0 + 1, 1)
                fy, fx = y - y0, x - x0
                r[i, j] = ((1 - fy) * (1 - fx) * m[y0, x0] + (1 - fy) * fx * m[y0, x1]
                           + fy * (1 - fx) * m[y1, x0] + fy * fx * m[y1, x1])
        return r
    for k in range(2):
        expected = (l1[..., k].double().numpy() + up(l2[..., k].double().numpy())) / 2
        np.testing.assert_allclose(out[k].numpy(), expected, rtol=1e-6)
    sm = M.k_way_softmax(out).double().numpy()
    o = out.double().numpy()
    np.testing.assert_allclose(sm[1], 1 / (1 + np.exp(o[0] - o[1])), rtol=1e-6)


def test_test_cross_takes_the_first_k_columns_of_77_way_probabilities():
    p = torch.rand(2, 2, 77, generator=torch.Generator().manual_seed(3)).softmax(dim=-1)
    q = torch.rand(2, 2, 77, generator=torch.Generator().manual_seed(4)).softmax(dim=-1)
    out = M.test_cross([p, q], 3, (2, 2))
    np.testing.assert_allclose(out.numpy(), ((p[..., :3] + q[..., :3]) / 2).permute(2, 0, 1).numpy(), rtol=1e-6)


def test_class_weights_follow_the_spec():
    # K = 4: background 6 px, part 1: 2 px, part 2: 4 px, part 3 absent
    mask = torch.tensor([[0, 0, 0, 1], [0, 0, 0, 1], [2, 2, 2, 2]])
    w = L.class_weights(mask, 4)
    assert w.tolist() == [1.0, 3.0, 1.5, 0.0]   # non-bg = 6: 6/2, 6/4, absent 0


def test_weighted_cross_entropy_by_hand():
    mask = torch.tensor([[0, 1], [2, 2]])
    logits = torch.tensor([[[1.0, 0.0], [0.5, 0.2]], [[0.0, 2.0], [0.1, 0.3]], [[-1.0, 0.5], [2.0, 1.0]]],
                          dtype=torch.float64)
    w = {0: 1.0, 1: 3 / 1, 2: 3 / 2}
    num = den = 0.0
    for i in range(2):
        for j in range(2):
            z = logits[:, i, j].numpy()
            y = int(mask[i, j])
            nll = -(z[y] - math.log(np.exp(z).sum()))
            num += w[y] * nll
            den += w[y]
    assert float(L.cross_entropy(logits, mask)) == pytest.approx(num / den, rel=1e-6)


def test_was_mse_is_k_times_the_mean_over_classes_and_pixels():
    mask = torch.tensor([[0, 1], [1, 2]])
    was_maps = torch.tensor([[[0.5, 0.1], [0.2, 0.3]], [[0.3, 0.8], [0.6, 0.3]], [[0.2, 0.1], [0.2, 0.4]]])
    total = 0.0
    for k in range(3):
        for i in range(2):
            for j in range(2):
                total += (float(was_maps[k, i, j]) - (1.0 if int(mask[i, j]) == k else 0.0)) ** 2
    # K x the mean over 3 * 4 elements = the paper's sum over classes of per-class means
    assert float(L.was_mse(was_maps, mask)) == pytest.approx(3 * total / 12, rel=1e-6)


def test_sd_loss_uses_guidance_and_the_v_target():
    u = torch.tensor([0.1, -0.2, 0.3, 0.0])
    c = torch.tensor([0.2, -0.1, 0.25, 0.05])
    eps = torch.tensor([0.5, 0.4, -0.3, 1.0])
    z0 = torch.tensor([1.0, -1.0, 0.5, 0.0])
    a = torch.tensor(0.81, dtype=torch.float64)
    guided = [float(u[i]) + 100 * (float(c[i]) - float(u[i])) for i in range(4)]
    expect_eps = sum((guided[i] - float(eps[i])) ** 2 for i in range(4)) / 4
    got = L.sd_loss(u, c, L.sd_target("epsilon", eps, z0, a), 100)
    assert float(got) == pytest.approx(expect_eps, rel=1e-5)
    v = [0.9 * float(eps[i]) - math.sqrt(0.19) * float(z0[i]) for i in range(4)]
    expect_v = sum((guided[i] - v[i]) ** 2 for i in range(4)) / 4
    assert float(L.sd_loss(u, c, L.sd_target("v_prediction", eps, z0, a), 100)) == pytest.approx(expect_v, rel=1e-5)
    with pytest.raises(ValueError, match="prediction_type"):
        L.sd_target("sample", eps, z0, a)


def test_combine_weights():
    out = L.combine(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(10.0), 1.0, 0.005)
    assert float(out.total) == pytest.approx(1 + 2 + 0.05)
    assert out.numbers()["sd"] == 10.0
