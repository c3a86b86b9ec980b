"""The DiffSeg predictor: a loaded Kandinsky 2.2 (``modeling.kandinsky``) with the trained
SCM and PAM, turning episodes into mask scores. Stages 2–7 of DIFFSEG.md §3; the maths
is in ``stages``, ``scm``, ``pam``; this module holds the model I/O and the wiring."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from ...errors import ConfigError
from ...modeling.added_kv import AddedKVCapture
from ..diffews import MaskScores
from ..model import EpisodeInputs
from .edges import EdgeDetector
from .pam import WIDTH as PAM_WIDTH, PerceptualAttention
from .scm import SpatialControl, control_levels
from .stages import (THRESHOLD_MODES, decoded_scores, fuse_maps, masked_supports, noised_latent, query_noise,
                     shot_mean, to_uint8)

RESOLUTION = 512
TIMESTEP = 100          # O1: one pass at t = 100 (ᾱ = 0.867 on the 2.2 schedule)
THRESHOLD = 0.5         # O8: absolute, on the decoded score in [0, 1]
# Resolutions must give whole attention grids: latent (R/8) divisible by the coarsest
# attention factor (8), i.e. R divisible by 64.
RESOLUTION_STEP = 64


@dataclass(frozen=True)
class DiffSegConfig:
    """What a checkpoint fixes about inference (recorded in its fewshot.json)."""

    resolution: int = RESOLUTION
    timestep: int = TIMESTEP
    threshold: float = THRESHOLD
    threshold_mode: str = "absolute"
    layers: tuple[int, ...] | None = None   # added-KV layers fused into M_a (forward order); None: all (O5)
    seed: int = 0                           # test-time noise: ε from (seed, the query photo's digest)
    pam_width: int = PAM_WIDTH
    positions: bool = True                  # PAM position codes on Att2/Att3 (O6)

    def __post_init__(self):
        if self.resolution < RESOLUTION_STEP or self.resolution % RESOLUTION_STEP:
            raise ConfigError(f"resolution {self.resolution} must be a positive multiple of {RESOLUTION_STEP} "
                              "(whole 1/8, 1/16, 1/32 attention grids)")
        if not 0 <= self.timestep < 1000:
            raise ConfigError(f"timestep {self.timestep} must lie in 0..999")
        if self.threshold_mode not in THRESHOLD_MODES:
            raise ConfigError(f"unknown threshold mode {self.threshold_mode!r}; use {' or '.join(THRESHOLD_MODES)}")
        if not 0.0 <= self.threshold < 1.0:
            raise ConfigError(f"threshold {self.threshold} must lie in [0, 1)")
        if self.pam_width < 4 or self.pam_width % 4:
            raise ConfigError(f"PAM width {self.pam_width} must be a positive multiple of 4")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    def to_json(self) -> dict:
        d = asdict(self)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d


@dataclass
class Features:
    """One batch of episodes as the trainable part sees it (all deterministic but the noise)."""

    query_latent: torch.Tensor      # (B, 4, h, w) MoVQ(I_q), clean
    support_latent: torch.Tensor    # (B, 4, h, w) k-shot mean of MoVQ(2S − 1)
    image_embeds: torch.Tensor      # (B, P) k-shot mean of CLIP(S)
    edges: torch.Tensor             # (B, 1, R, R) query edge maps in [0, 1]
    noise: torch.Tensor             # (B, 4, h, w) ε

    def to(self, device, dtype=None) -> "Features":
        return Features(*(t.to(device, dtype) if t.is_floating_point() else t.to(device)
                          for t in (self.query_latent, self.support_latent, self.image_embeds, self.edges,
                                    self.noise)))

    @staticmethod
    def cat(parts: Sequence["Features"]) -> "Features":
        return Features(*(torch.cat([getattr(p, f) for p in parts]) for f in
                          ("query_latent", "support_latent", "image_embeds", "edges", "noise")))


class DiffSegHeads(torch.nn.Module):
    """The trainable part (SCM + PAM). ``forward`` runs stages 3–6 on a frozen UNet that is
    passed in, not registered (so distributed wrappers never touch its 1.25 B weights)."""

    def __init__(self, unet, latent_channels: int, config: DiffSegConfig):
        super().__init__()
        self.scm = SpatialControl(control_levels(unet))
        self.pam = PerceptualAttention(latent_channels, config.pam_width, config.positions)

    def forward(self, unet, feats: Features, alpha_bar: float, timestep: int,
                layers: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(M_a (B, 1, h, w), L_pre (B, 4, h, w))."""
        z_t = noised_latent(feats.query_latent.to(unet.dtype), alpha_bar, feats.noise)
        t = torch.full((z_t.shape[0],), timestep, device=z_t.device, dtype=torch.long)
        with self.scm.attached(unet, feats.edges), AddedKVCapture(unet, layers) as cap:
            maps = cap.run(z_t, t, feats.image_embeds.to(unet.dtype))
        m_a = fuse_maps([m.cross for m in maps], [m.self_attn for m in maps], tuple(z_t.shape[-2:]))
        l_pre = self.pam(feats.query_latent, feats.support_latent, m_a)
        return m_a, l_pre


# --- stage 2/3 inputs -------------------------------------------------------------------------

def _wide(t: torch.Tensor) -> torch.Tensor:
    """float32, or wider when the model is (a float64 test model stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def encode_each(encode, images: torch.Tensor) -> torch.Tensor:
    """``encode`` image by image: an image's encoding then never depends on the batch it
    came in (batched convolutions round differently), so k identical supports give the
    1-shot features exactly and the training cache equals inference. MoVQ and CLIP bigG
    each cost ~1 TFLOP per 512² image, enough work per call for a GPU."""
    return torch.cat([encode(images[i:i + 1]) for i in range(images.shape[0])])


def query_inputs(base, queries: torch.Tensor, detector: EdgeDetector, seed: int):
    """(latents (N, 4, h, w), edges (N, 1, R, R) in [0, 1], noise (N, 4, h, w)) of query
    photos (N, 3, R, R) in [−1, 1]."""
    latents = _wide(encode_each(base.encode, queries))
    edges = torch.stack([torch.from_numpy(detector(a)) for a in to_uint8((queries + 1) / 2)])
    noise = torch.stack([query_noise(q, tuple(latents.shape[1:]), seed) for q in queries])
    return latents, edges[:, None].float() / 255, noise


def support_inputs(base, supports: torch.Tensor, masks: torch.Tensor):
    """(latents (N, 4, h, w), image embeddings (N, P)) of masked supports."""
    s = masked_supports(supports, masks)
    pixels = to_uint8(s)
    embeds = torch.cat([base.image_embeds([p]) for p in pixels])
    return _wide(encode_each(base.encode, 2 * s - 1)), _wide(embeds)


@dataclass
class DiffSeg:
    base: object                      # modeling.kandinsky.Kandinsky22
    heads: DiffSegHeads
    config: DiffSegConfig
    edges: EdgeDetector
    info: dict = field(default_factory=dict)    # checkpoint fewshot.json and where it came from

    @property
    def sd(self):
        """The base model under the name the shared few-shot shells read (``model.sd.info``:
        its identity, digests and the random-weights flag)."""
        return self.base

    @property
    def alpha_bar(self) -> float:
        return float(self.base.alphas_cumprod[self.config.timestep])

    def features(self, batch: Sequence[EpisodeInputs]) -> Features:
        """Stages 2–3 for episodes of equal shots (each image encoded on its own)."""
        shots = {e.shots for e in batch}
        if len(shots) != 1:
            raise ValueError(f"episodes of one batch must have equal shots, got {sorted(shots)}")
        k = shots.pop()
        q_lat, edges, noise = query_inputs(self.base, torch.stack([e.query for e in batch]), self.edges,
                                           self.config.seed)
        s_lat, embeds = support_inputs(self.base, torch.cat([e.supports for e in batch]),
                                       torch.cat([e.support_masks for e in batch]))
        return Features(q_lat, shot_mean(s_lat, k), shot_mean(embeds, k), edges, noise)

    def maps_and_latents(self, feats: Features) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.base.unet, feats.to(self.base.device), self.alpha_bar, self.config.timestep,
                          self.config.layers)

    @torch.no_grad()
    def predict(self, batch: Sequence[EpisodeInputs]) -> list[MaskScores]:
        """Stages 2–7: mask scores at the model resolution, one per episode."""
        _, l_pre = self.maps_and_latents(self.features(batch))
        return decoded_scores(self.base.decode(l_pre), self.config.threshold, self.config.threshold_mode)

    def describe(self) -> dict:
        return {"method": "diffseg", "config": self.config.to_json(), "edges": self.edges.describe(), **self.info}
