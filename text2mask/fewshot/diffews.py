"""DiffewS (Zhu et al., NeurIPS 2024): few-shot segmentation in one UNet step.

Stages of one episode (class c, query x_q, supports (x_i, m_i), i = 1..k), all at the
model resolution R x R (the photos squashed, the masks resized nearest):

2. Encode. s = the VAE scaling factor, E_μ the posterior mean (training samples instead):
       z_q = s·E_μ(x_q),     u_i = [s·E_μ(x_i) ; s·E_μ(m̃_i)]   (4 + 4 channels)
   where m̃_i is the support mask drawn white on black, three channels in [-1, 1].
3. Support pass. The UNet runs on conv_in_ref(u_i) (a new 8→320 input conv) at t = 1
   with the empty prompt c∅ and plain self-attention; every ``attn1`` (all 16 blocks)
   keeps its per-head keys and values K_i, V_i.
4. Query pass. The UNet runs on conv_in(z_q) at t = 1 with c∅; every ``attn1`` uses the
   query's own queries Q_q against the query's tokens followed by all supports' tokens:
       attn1 = softmax(Q_q [K_q; K_1; …; K_k]ᵀ / √d) [V_q; V_1; …; V_k]
   Cross-attention, FFN and weights are unchanged. The mask latent is
       ẑ_m = −UNet(z_q, 1, c∅)
   because the released scheduler (DDIM, v-prediction, β_start = β_end = 1) has ᾱ_t = 0,
   so DDIM's x̂_0 = √ᾱ_t·x_t − √(1−ᾱ_t)·v = −v: no scheduler is needed.
5. Decode. x̂ = clip(D(ẑ_m / s), −1, 1); u8 = ⌊(x̂/2 + ½)·255⌋ per RGB channel;
   score = mean_rgb(u8) / 255; the query mask keeps score > τ_r · max(u8) / 255 with
   τ_r = 0.25 (the reference's relative threshold). The score is resized to the query's
   own size before the comparison; the threshold value is the one taken at R x R.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..modeling.capture import swap_processors, transformer_blocks

TIMESTEP = 1                   # the reference trains and tests at t = 1
RELATIVE_THRESHOLD = 0.25      # paper's sweep: 0.25 best (47.69 mIoU, COCO fold 0)
RESOLUTION = 512
SUPPORT_CHANNELS = 8           # image latent ⊕ mask latent
TEXT_CONDITIONS = ("padded", "unpadded")


# --- 3/4. KV fusion in the self-attention -----------------------------------------------

def self_attention_keys(unet) -> list[str]:
    """Processor keys of ``attn1`` of every transformer block, in forward order."""
    return [b.processor_key("attn1") for b in transformer_blocks(unet)]


class KVStore:
    """Keys and values of the support pass, per ``attn1``, for one batch of episodes.

    ``shots`` supports per episode; the support batch is episode-major (episode e's
    supports are rows e·k … e·k + k − 1). The query pass takes each entry out, so the
    store is empty once an episode batch is done."""

    def __init__(self, shots: int):
        self.shots = shots
        self.recording = False
        self._kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def put(self, key: str, k: torch.Tensor, v: torch.Tensor) -> None:
        self._kv[key] = (k, v)

    def take(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.shots == 0:
            return None
        if key not in self._kv:
            raise RuntimeError(f"no support keys/values stored for {key}: run the support pass first")
        return self._kv.pop(key)

    def clear(self) -> None:
        self._kv.clear()

    def __len__(self) -> int:
        return len(self._kv)


class KVFusionProcessor:
    """``attn1`` processor: stores K, V in the support pass; in the query pass attends
    over [query tokens; all k supports' tokens] of its own episode (equation above)."""

    def __init__(self, store: KVStore, key: str):
        self.store, self.key = store, key

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if (encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None
                or attn.group_norm is not None or hidden_states.ndim != 3 or attn.norm_q is not None):
            raise NotImplementedError("KV fusion supports plain SD self-attention (attn1) only")
        b, n, _ = hidden_states.shape
        h = attn.heads
        q, k, v = (proj(hidden_states) for proj in (attn.to_q, attn.to_k, attn.to_v))
        d = q.shape[-1] // h
        q, k, v = (t.view(b, -1, h, d).transpose(1, 2) for t in (q, k, v))     # (B, h, N, d)
        if self.store.recording:
            self.store.put(self.key, k, v)
        else:
            support = self.store.take(self.key)
            if support is not None:
                ks, vs = (self._per_episode(t, b) for t in support)
                k, v = torch.cat([k, ks], dim=2), torch.cat([v, vs], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        out = out.transpose(1, 2).reshape(b, n, h * d).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def _per_episode(self, t: torch.Tensor, episodes: int) -> torch.Tensor:
        """(B·k, h, N_s, d) episode-major -> (B, h, k·N_s, d): one episode's supports side by side."""
        bk, h, ns, d = t.shape
        k = self.store.shots
        if bk != episodes * k:
            raise RuntimeError(f"{bk} stored supports for {episodes} episode(s) of {k} shot(s)")
        return t.view(episodes, k, h, ns, d).permute(0, 2, 1, 3, 4).reshape(episodes, h, k * ns, d)


# --- 3. the support input conv ----------------------------------------------------------

def support_conv_in(conv_in: torch.nn.Conv2d) -> torch.nn.Conv2d:
    """conv_in_ref: 8 → C, initialised as [W, W] / 2 with conv_in's bias, so that
    conv_in_ref(z ⊕ z) = conv_in(z) at the start of training."""
    ref = torch.nn.Conv2d(SUPPORT_CHANNELS, conv_in.out_channels, conv_in.kernel_size, conv_in.stride,
                          conv_in.padding, bias=True, device=conv_in.weight.device, dtype=conv_in.weight.dtype)
    with torch.no_grad():
        ref.weight.copy_(conv_in.weight.repeat(1, 2, 1, 1) / 2)
        ref.bias.copy_(conv_in.bias)
    return ref


class DiffewsUNet(torch.nn.Module):
    """The trainable part: the whole UNet plus conv_in_ref. ``forward`` runs the support
    pass and the query pass of a batch of episodes and returns the mask latents ẑ_m."""

    def __init__(self, unet, conv_in_ref: torch.nn.Conv2d):
        super().__init__()
        self.unet = unet
        self.conv_in_ref = conv_in_ref

    def forward(self, query_latents: torch.Tensor, support_inputs: torch.Tensor, shots: int,
                text: torch.Tensor) -> torch.Tensor:
        """query_latents (B, 4, h, w); support_inputs (B·k, 8, h, w) episode-major;
        text (1, T, D) the empty-prompt embedding. Returns ẑ_m = −UNet output, (B, 4, h, w)."""
        b = query_latents.shape[0]
        if support_inputs.shape[0] != b * shots:
            raise ValueError(f"{support_inputs.shape[0]} support inputs for {b} episode(s) of {shots} shot(s)")
        store = KVStore(shots)
        procs = {key: KVFusionProcessor(store, key) for key in self_attention_keys(self.unet)}
        t = torch.full((b,), TIMESTEP, device=query_latents.device, dtype=torch.long)
        try:
            with swap_processors(self.unet, procs):
                if shots:
                    store.recording = True
                    self._support_pass(support_inputs, text)
                    store.recording = False
                out = self.unet(query_latents, t, encoder_hidden_states=text.expand(b, -1, -1)).sample
        finally:
            store.clear()
        return -out

    def _support_pass(self, support_inputs: torch.Tensor, text: torch.Tensor) -> None:
        # The UNet's input conv is swapped for conv_in_ref during this pass only; the
        # support pass's own output is not used (only the stored keys and values are).
        n = support_inputs.shape[0]
        t = torch.full((n,), TIMESTEP, device=support_inputs.device, dtype=torch.long)
        conv_in = self.unet.conv_in
        self.unet.conv_in = self.conv_in_ref
        try:
            self.unet(support_inputs, t, encoder_hidden_states=text.expand(n, -1, -1))
        finally:
            self.unet.conv_in = conv_in


# --- 2. inputs at the model resolution --------------------------------------------------

def square_image(rgb: np.ndarray, size: int) -> torch.Tensor:
    """(3, size, size) in [-1, 1]: the photo squashed to a square (bilinear, PIL, as the
    reference's torchvision Resize on PIL images)."""
    img = Image.fromarray(np.asarray(rgb, np.uint8)).resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1.0


def square_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """(size, size) bool: nearest resize, as HSNet's F.interpolate(mode='nearest')."""
    m = torch.from_numpy(np.asarray(mask, bool)).float()[None, None]
    return F.interpolate(m, size=(size, size), mode="nearest")[0, 0] > 0.5


def mask_to_image(mask: torch.Tensor) -> torch.Tensor:
    """(…, H, W) bool -> (…, 3, H, W) in {−1, 1}: white object on black."""
    return (mask.float() * 2 - 1).unsqueeze(-3).expand(*mask.shape[:-2], 3, *mask.shape[-2:])


# --- 5. decoding ------------------------------------------------------------------------

def mask_image_uint8(decoded: torch.Tensor) -> torch.Tensor:
    """VAE output (B, 3, R, R) -> uint8 RGB: clip to [−1, 1], map to [0, 255], truncate
    (the reference's ``astype(np.uint8)``)."""
    x = decoded.float().clamp(-1.0, 1.0) * 0.5 + 0.5
    return (x * 255).to(torch.uint8)


@dataclass(frozen=True)
class MaskScores:
    """One query's decoded mask image reduced to a score map and its threshold."""

    score: np.ndarray      # (R, R) float32: mean_rgb(u8) / 255
    threshold: float       # τ_r · max(u8) / 255

    def mask(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """(H, W) bool at ``size`` (height, width); default the model resolution. The score
        is resized (bilinear, antialiased) before thresholding."""
        score = self.score
        if size is not None and tuple(size) != score.shape:
            t = torch.from_numpy(score)[None, None]
            score = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False,
                                  antialias=True)[0, 0].numpy()
        return score > self.threshold


def mask_scores(u8: torch.Tensor, tau: float = RELATIVE_THRESHOLD) -> list[MaskScores]:
    """uint8 (B, 3, R, R) mask images -> score maps and relative thresholds. An all-black
    image has threshold 0 and keeps nothing (the comparison is strict)."""
    x = u8.float() / 255.0
    scores = x.mean(dim=1)
    peaks = x.flatten(1).amax(dim=1)
    return [MaskScores(s.numpy().astype(np.float32), float(tau * p)) for s, p in zip(scores.cpu(), peaks.cpu())]
