"""DiffSeg's stages as small pure functions over tensors (DIFFSEG.md §3; shapes at R = 512,
latent grid h = w = 64; B episodes, k shots).

2. support encodings   ``masked_supports``, ``shot_mean``
3. query latent        ``noised_latent``, ``query_noise``
5. maps → M_a          ``interpolation_matrix``, ``fuse_maps``, ``minmax``
7. decode              ``decoded_scores``
   loss [P eq. 10]     ``map_targets``, ``diffseg_loss``
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...modeling.latents import image_seed, q_sample
from ..diffews import MaskScores

# Loss weights of eq. 10: L = 2·MSE(M_a, G) + 1·MSE(L_pre, MoVQ(Ĝ)).
MAP_WEIGHT = 2.0
LATENT_WEIGHT = 1.0
# minmax of a map whose range is below this fraction of its magnitude gives 0: a constant
# map (up to rounding) has no "where", and dividing by its range would amplify rounding.
RANGE_EPS = 1e-6
THRESHOLD_MODES = ("absolute", "relative")


# --- 2. support encodings ---------------------------------------------------------------

def masked_supports(supports: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """S = I_s ⊗ M_s in [0, 1] [P eq. 3]: (N, 3, R, R) photos in [−1, 1] and (N, R, R)
    bool masks -> the photos with the background black."""
    return (supports.float() + 1) / 2 * masks[:, None].float()


def to_uint8(images01: torch.Tensor) -> list[np.ndarray]:
    """(N, 3, R, R) in [0, 1] -> N uint8 (R, R, 3) arrays (rounded: the squashed photos
    are uint8 to begin with, so a photo comes back exactly)."""
    u8 = (images01.clamp(0, 1) * 255).round().to(torch.uint8)
    return [a.permute(1, 2, 0).contiguous().cpu().numpy() for a in u8]


def shot_mean(x: torch.Tensor, shots: int) -> torch.Tensor:
    """(B·k, …) episode-major -> (B, …): the k-shot mean of latents or embeddings [P §4.1]
    (O10: mean fusion). The mean is taken in float64 and cast back, so that k identical
    supports give exactly the 1-shot tensor."""
    if x.shape[0] % shots:
        raise ValueError(f"{x.shape[0]} support rows for {shots} shot(s)")
    return x.view(-1, shots, *x.shape[1:]).double().mean(dim=1).to(x.dtype)


# --- 3. the noised query latent ---------------------------------------------------------

def query_noise(query: torch.Tensor, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """ε ~ N(0, I) of ``shape`` for one query photo, from (seed, the photo's content
    digest) (O1): the same photo gets the same noise in any batch, order, shard or
    process, and a different photo other noise."""
    digest = hashlib.sha256(query.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
    g = torch.Generator().manual_seed(image_seed(seed, digest))
    return torch.randn(tuple(shape), generator=g)


def noised_latent(latent: torch.Tensor, alpha_bar: float, noise: torch.Tensor) -> torch.Tensor:
    """z_t = √ᾱ_t L_q + √(1 − ᾱ_t) ε [P eq. 5]."""
    return q_sample(latent, torch.as_tensor(alpha_bar, dtype=latent.dtype, device=latent.device),
                    noise.to(latent.device, latent.dtype))


# --- 5. maps -> M_a ---------------------------------------------------------------------

def interpolation_matrix(size: int, grid: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """A (size × grid): 1-d linear interpolation from ``grid`` to ``size`` samples
    (align_corners=False, as F.interpolate). Bilinear upsampling of a (g, g) map X is
    A X Aᵀ, so the 2-d upsampling matrix is U = A ⊗ A (row-major vec)."""
    eye = torch.eye(grid, dtype=dtype, device=device)[:, None, :]
    return F.interpolate(eye, size=size, mode="linear", align_corners=False)[:, 0, :].T.contiguous()


def _up(x: torch.Tensor, ah: torch.Tensor, aw: torch.Tensor) -> torch.Tensor:
    """(B, g, g) -> (B, H, W): U x = A_h X A_wᵀ."""
    return ah @ x @ aw.T


def _up_adjoint(x: torch.Tensor, ah: torch.Tensor, aw: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B, g, g): Uᵀ x = A_hᵀ X A_w."""
    return ah.T @ x @ aw


def minmax(m: torch.Tensor) -> torch.Tensor:
    """Per-episode (m − min) / (max − min) over all but the first axis; 0 where the map is
    constant (within RANGE_EPS of its magnitude), never NaN."""
    flat = m.flatten(1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    span = hi - lo
    flat_ok = span > RANGE_EPS * flat.abs().max(dim=1).values.clamp_min(1.0)
    safe = torch.where(flat_ok, span, torch.ones_like(span))
    out = (flat - lo[:, None]) / safe[:, None]
    return torch.where(flat_ok[:, None], out, torch.zeros_like(out)).view_as(m)


def fuse_maps(cross: Sequence[torch.Tensor], self_maps: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """M_a (B, 1, H, W) from per-layer cross maps (B, g, g) and row-stochastic self maps
    (B, g², g²) [P eq. 11], uniformly over the layers given (O5):

        M_cross = mean_ℓ U_ℓ c_ℓ                                   (B, H·W)
        M_self  = mean_ℓ U_ℓ rownorm(S_ℓ U_ℓᵀ)                      (B, H·W, H·W)
        M_a     = minmax(M_self · M_cross)

    computed without any (H·W)² matrix (O4): rownorm(S Uᵀ)·c = (S (Uᵀ c)) / (S (Uᵀ 1)),
    so each layer costs O(g⁴) and the result is exact. Work in float32 or wider."""
    if len(cross) != len(self_maps) or not cross:
        raise ValueError(f"{len(cross)} cross maps and {len(self_maps)} self maps")
    h, w = size
    work = torch.promote_types(cross[0].dtype, torch.float32)
    mats: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def matrices(gh: int, gw: int):
        if (gh, gw) not in mats:
            dev = cross[0].device
            mats[gh, gw] = (interpolation_matrix(h, gh, work, dev), interpolation_matrix(w, gw, work, dev))
        return mats[gh, gw]

    m_cross = sum(_up(c.to(work), *matrices(*c.shape[-2:])) for c in cross) / len(cross)    # (B, H, W)
    fused = torch.zeros_like(m_cross)
    for c, s in zip(cross, self_maps):
        gh, gw = c.shape[-2:]
        ah, aw = matrices(gh, gw)
        s = s.to(work)
        num = s @ _up_adjoint(m_cross, ah, aw).flatten(1)[..., None]                      # S (Uᵀ c)
        ones = torch.ones((1, h, w), dtype=work, device=c.device)
        den = s @ _up_adjoint(ones, ah, aw).flatten(1)[..., None]                          # S (Uᵀ 1)
        fused = fused + _up((num / den).view(-1, gh, gw), ah, aw)
    return minmax(fused / len(cross))[:, None]


# --- the loss [P eq. 10] -----------------------------------------------------------------

def map_targets(masks: torch.Tensor, ignore: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, weight), both (N, 1, h, w) (O12): G the query mask area-pooled to the latent grid
    over its non-ignored pixels (soft, in [0, 1]), weight the cell's share of non-ignored
    pixels (PASCAL's 255 boundaries are left out of the map term)."""
    valid = (~ignore).float()[:, None]
    fg = (masks & ~ignore).float()[:, None]
    v = F.adaptive_avg_pool2d(valid, grid)
    g = F.adaptive_avg_pool2d(fg, grid) / v.clamp_min(1e-12)
    return torch.where(v > 0, g, torch.zeros_like(g)), v


def diffseg_loss(m_a: torch.Tensor, l_pre: torch.Tensor, g: torch.Tensor, weight: torch.Tensor,
                 l_gt: torch.Tensor) -> torch.Tensor:
    """2·MSE(M_a, G) (weighted by the non-ignored share of each cell) + 1·MSE(L_pre, MoVQ(Ĝ))."""
    w = weight.to(m_a.dtype)
    map_term = (w * (m_a - g.to(m_a.dtype)) ** 2).sum() / w.sum().clamp_min(1e-12)
    latent_term = F.mse_loss(l_pre.float(), l_gt.float())
    return MAP_WEIGHT * map_term.float() + LATENT_WEIGHT * latent_term


# --- 7. decode ----------------------------------------------------------------------------

def decoded_scores(decoded: torch.Tensor, threshold: float, mode: str = "absolute") -> list[MaskScores]:
    """MoVQ output (B, 3, R, R) -> score = mean_rgb((clip(x, −1, 1) + 1) / 2) and its
    threshold (O8): ``absolute`` keeps score > threshold (0.5: the mask is drawn white on
    black, so mid-grey separates them); ``relative`` keeps score > threshold · max(score)
    (DiffewS' τ_r rule)."""
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"unknown threshold mode {mode!r}; use one of {', '.join(THRESHOLD_MODES)}")
    score = ((decoded.float().clamp(-1, 1) + 1) / 2).mean(dim=1).cpu()
    out = []
    for s in score:
        t = threshold if mode == "absolute" else threshold * float(s.max())
        out.append(MaskScores(s.numpy().astype(np.float32), float(t)))
    return out
