"""The Python API of personalized referring segmentation (paper §5.3):
``Referrer.from_pretrained(model)(image, [Query(concept, text)], class_name="mug")``.

Per scene photo (all passes share one noised latent z_t, drawn from the photo's seed):

    1. preprocess, VAE-encode and noise as in WSSS
    2. object area: base model, "a photo including <class>."; SC = normalized SelfCross of
       the class tokens; F = cells where SC > (τ − SC)^p  (τ 1, p 2: SC > 0.382)
    3. instance maps: per query, its concept applied, prompt = text with "<class>" ->
       "<token> <class>"; A_i = normalized SelfCross over the chosen span
    4. segments: normalized cuts of the base pass's Self restricted to F (``spectral``);
       K given (the photo's items), else chosen by the eigengap, K >= max(2, queries)
    5. c[i, s] = mean of A_i over segment s
    6. bf (each item alone) and af (Hungarian over the photo's queries) (``assign``)
    7. masks: the assigned segment, upsampled like WSSS labels (nearest, crop, nearest)

Cost: 1 + #queries UNet passes (each stopped after the last hooked block); the queries
of one concept share one pass batch, so each concept is applied once per photo.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from ..io import image_input
from ..modeling.capture import CROSS_BLOCKS, SELF_BLOCK, AttentionCapture
from ..modeling.latents import Draws, image_seed, latent_sample, q_sample
from ..modeling.loading import DEFAULT_MODEL, StableDiffusion, load
from ..preprocess import MULTIPLE, Geometry, geometry, prepare
from ..wsss import propagate as P
from . import assign, spectral
from .concept import Concept, add_tokens
from .query import SPAN_MODES, QueryPrompt, area_prompt, compose_query, subject_text, without_token

QUERY_MODES = ("full", "subject", "context")


def min_segments(queries: int) -> int:
    """The fewest segments the eigengap may choose: one per query, and at least 2 (the
    task is a photo of look-alikes; one segment would be the whole object area — give
    ``segments=1`` for a photo of one item)."""
    return max(2, queries)


@dataclass(frozen=True)
class ReferConfig:
    """Hyper-parameters (paper §5.1 values); ``query``/``tokens`` are the ablations."""

    timestep: int = 150
    seed: int = 0
    box_threshold: float = 0.2
    area_tau: float = 1.0
    area_power: float = 2.0
    tokens: str = "phrase"      # span A_i averages over: phrase | token | class | text
    query: str = "full"         # full (text + concept) | subject ("a <new1> mug") | context (text, base model)
    long_side: int | None = None  # None: WSSS reference resize (704-1024 px); else this long side (ours: fast CPU runs)

    def __post_init__(self):
        if self.tokens not in SPAN_MODES:
            raise InputError(f"tokens must be one of {', '.join(SPAN_MODES)}, got {self.tokens!r}")
        if self.query not in QUERY_MODES:
            raise InputError(f"query must be one of {', '.join(QUERY_MODES)}, got {self.query!r}")
        if self.long_side is not None and self.long_side < MULTIPLE:
            raise InputError(f"long side must be at least {MULTIPLE} pixels, got {self.long_side}")


@dataclass(frozen=True)
class Query:
    concept: Concept | None   # None: the base model (no personal token)
    text: str                 # with the plain class word (or the concept's token)


@dataclass
class ReferResult:
    """Named maps of one photo. Grid maps are on the self-attention grid (h, w); image
    maps at the photo's size (H, W). Segments are numbered 1..K (0 = outside the object
    area); ``bf``/``af`` hold segment numbers."""

    key: str
    class_name: str
    prompts: list[str]              # per query, the text fed to the model
    object_score: np.ndarray        # (h, w) SC of the class on the base model
    object_area: np.ndarray         # (h, w) bool F
    instance_maps: np.ndarray       # (Q, h, w) A_i
    segment_grid: np.ndarray        # (h, w) 0..K
    segments: np.ndarray            # (H, W) uint8 0..K
    correlation: np.ndarray         # (Q, K) c[i, s]
    bf: np.ndarray                  # (Q,) 1..K
    af: np.ndarray                  # (Q,) 1..K
    segments_from: str = "given"    # given | eigengap (K chosen from the attention)

    @property
    def num_segments(self) -> int:
        return self.correlation.shape[1]

    @property
    def masks(self) -> np.ndarray:
        """(Q, H, W) bool: the af segment of each query."""
        return self.segments[None] == self.af[:, None, None]

    @property
    def masks_bf(self) -> np.ndarray:
        return self.segments[None] == self.bf[:, None, None]


class Referrer:
    def __init__(self, sd: StableDiffusion, config: ReferConfig | None = None):
        self.sd = sd
        self.config = config or ReferConfig()
        # Keyed by (concept digest, text): the same text under another concept embeds differently.
        self._text_cache: dict[tuple[str | None, str], torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, config: ReferConfig | None = None,
                        device: str | None = None, dtype: str | None = None, revision: str | None = None,
                        config_source: str | None = None, original_config: str | None = None) -> "Referrer":
        """``model``: hub id, diffusers folder or single file (then ``config_source`` /
        ``original_config`` are diffusers' ``config`` / ``original_config``)."""
        return cls(load(model, device=device, dtype=dtype, revision=revision, config=config_source,
                        original_config=original_config), config)

    # -- stage 1: the photo's noised latent, shared by every pass -------------------------
    def noised_latent(self, key: str, rgb: np.ndarray) -> tuple[torch.Tensor, Geometry]:
        """z_t = √ᾱ_t · (μ + σ·ε₀)·scale + √(1 − ᾱ_t)·ε, both draws from (seed, photo id)."""
        sd, cfg = self.sd, self.config
        geo = geometry(*rgb.shape[:2], cfg.long_side)
        x = prepare(rgb, geo)[None].to(sd.device, sd.dtype)
        with torch.inference_mode():
            mean, std = sd.posterior(x)
        draws = Draws.default(cfg.seed, key, mean.shape[1:], samples=1)
        z = latent_sample(mean[0], std[0], draws.eps0.to(sd.device), sd.latent_scale)
        return q_sample(z, sd.alphas_cumprod[cfg.timestep], draws.noise.to(sd.device)).to(sd.dtype), geo

    # -- prompts ----------------------------------------------------------------------------
    def _embed(self, concept: Concept | None, text: str) -> torch.Tensor:
        key = (concept.digest if concept else None, text)
        if key not in self._text_cache:
            ids = self.sd.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
            with torch.inference_mode():
                emb = self.sd.text_encoder(ids.to(self.sd.device))[0][0]
            if len(self._text_cache) > 4096:
                self._text_cache.clear()
            self._text_cache[key] = emb
        return self._text_cache[key]

    def query_prompt(self, query: Query, class_name: str) -> tuple[Concept | None, QueryPrompt]:
        """The concept the pass runs with and its prompt, per the ``query`` ablation."""
        mode, concept = self.config.query, query.concept
        if concept is not None:
            add_tokens(self.sd, concept.tokens)   # before counting spans
        if mode == "context" or concept is None:
            text = without_token(query.text, concept.prompt_token) if concept else query.text
            return None, compose_query(self.sd.tokenizer, text, class_name, None)
        text = subject_text(class_name) if mode == "subject" else query.text
        return concept, compose_query(self.sd.tokenizer, text, class_name, concept.prompt_token)

    # -- stages 2-3: SelfCross maps of a batch of prompts on the same z_t ------------------
    def _self_cross(self, z_t: torch.Tensor, concept: Concept | None, prompts: Sequence[QueryPrompt],
                    mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized SelfCross maps (n, h, w) of each prompt's span and the Self (N, N)
        of the first row."""
        texts = torch.stack([self._embed(concept, p.text) for p in prompts])
        latents = z_t.expand(len(prompts), -1, -1, -1)
        t = torch.tensor(self.config.timestep, device=self.sd.device)
        with torch.inference_mode(), AttentionCapture(self.sd.unet, CROSS_BLOCKS, (SELF_BLOCK,)) as cap:
            maps = cap.run(latents, t, texts)
        box = self.config.box_threshold if self.config.box_threshold > 0 else None
        out = []
        for row, p in enumerate(prompts):
            cross = P.class_cross([maps.cross[b][row] for b in sorted(maps.cross)], [p.span(mode)], maps.grid)
            out.append(P.propagate(maps.self_attn[row], cross, box)[0])
        return torch.stack(out).cpu(), maps.self_attn[0].float().cpu()

    def object_area(self, z_t: torch.Tensor, class_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(SC, F, Self) of the base model's "a photo including <class>." pass."""
        sc, self_attn = self._self_cross(z_t, None, [area_prompt(self.sd.tokenizer, class_name)], "class")
        sc = sc[0].numpy().astype(np.float64)
        area = sc > (self.config.area_tau - sc) ** self.config.area_power
        return sc, area, self_attn.numpy()

    def instance_maps(self, z_t: torch.Tensor, queries: Sequence[Query], class_name: str) -> tuple[np.ndarray, list[str]]:
        """A_i (Q, h, w) and the prompts, one pass batch per distinct concept."""
        planned = [self.query_prompt(q, class_name) for q in queries]
        maps: list[np.ndarray | None] = [None] * len(queries)
        groups: dict[str | None, list[int]] = {}
        for i, (concept, _) in enumerate(planned):
            groups.setdefault(concept.digest if concept else None, []).append(i)
        for rows in groups.values():
            concept = planned[rows[0]][0]
            with concept.applied(self.sd) if concept else nullcontext():
                sc, _ = self._self_cross(z_t, concept, [planned[i][1] for i in rows], self.config.tokens)
            for i, m in zip(rows, sc.numpy()):
                maps[i] = m
        return np.stack(maps).astype(np.float64), [p.text for _, p in planned]

    # -- one photo, end to end -----------------------------------------------------------
    def refer(self, key: str, rgb: np.ndarray, queries: Sequence[Query], class_name: str,
              segments: int | None = None) -> ReferResult:
        if not queries:
            raise InputError(f"{key}: no queries")
        z_t, geo = self.noised_latent(key, rgb)
        sc, area, self_attn = self.object_area(z_t, class_name)
        a, prompts = self.instance_maps(z_t, queries, class_name)
        k = segments or spectral.eigengap_segments(self_attn, area, min_segments(len(queries)))
        grid = spectral.segment(self_attn, area, k, seed=image_seed(self.config.seed, key))
        c = assign.correlation(a, grid, k)
        segments_image = P.labels_to_image(torch.from_numpy(np.asarray(grid)), geo)
        return ReferResult(key, class_name, prompts, sc, area, a, grid, segments_image, c,
                           assign.best_first(c) + 1, assign.assign_all(c) + 1,
                           "given" if segments else "eigengap")

    def __call__(self, image: str | Path | Image.Image | np.ndarray, queries: Sequence[Query], class_name: str,
                 segments: int | None = None, key: str | None = None) -> ReferResult:
        key, rgb = image_input(image, key)
        if segments is not None and segments < len(queries):
            raise InputError(f"{key}: {segments} segment(s) for {len(queries)} queries; each queried "
                             "item needs its own segment")
        return self.refer(key, rgb, queries, class_name, segments)

    def describe(self) -> dict:
        return {"config": asdict(self.config), "cross_blocks": list(CROSS_BLOCKS), "self_block": SELF_BLOCK}
