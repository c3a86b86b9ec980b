"""Capture of the added-KV attention of a Kandinsky 2.2 UNet (DIFFSEG.md §2, stage 4).

Every attention layer of the 2.2 decoder attends with ONE softmax over the 32 context
tokens (``add_k_proj``/``add_v_proj`` of ``ImageProjection(E)``) followed by the N
spatial tokens (``to_k``/``to_v`` of the group-normed feature map), context first
(diffusers' ``AttnAddedKVProcessor2_0``):

    P = softmax(Q [K_ctx ; K_sp]ᵀ / √d)  ∈ R^{B × h × N × (T + N)},   T = 32

The capture processor computes P explicitly (fp32, or float64 for a float64 UNet),
returns exactly the stock processor's output, and records per layer, from the head mean
P̄:

    cross = Σ_{t < T} P̄[:, :, t]                  (B, N)     the context mass (O3)
    self  = P̄[:, :, T:] / Σ_{j ≥ T} P̄[:, :, j]    (B, N, N)  the spatial slice, rows renormalised

Neither slice is normalised by itself in P: each row of P̄ sums to 1 over T + N keys.
Layers are numbered in forward order (down, mid, up; NOT ``named_modules()`` order,
which lists the mid block last). With ``stop_early`` the forward stops after the last
layer read: later layers cannot change a captured map.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import ModelLoadError
from .capture import ProcessorCapture, _Done  # one processor swap, one early stop for every capture


@dataclass(frozen=True)
class AddedKVLayer:
    index: int       # forward order
    name: str        # module path of the diffusers Attention, e.g. "up_blocks.2.attentions.3"
    factor: int      # spatial downsampling w.r.t. the latent (2, 4, 8 in Kandinsky 2.2)

    @property
    def processor_key(self) -> str:
        return f"{self.name}.processor"


def added_kv_layers(unet) -> list[AddedKVLayer]:
    """The UNet's attention layers in forward order with their grids; ModelLoadError when
    one is not an added-KV layer over [context; spatial] tokens."""
    layers: list[AddedKVLayer] = []
    bad: list[str] = []
    n = len(unet.down_blocks)

    def add(prefix: str, block, factor: int) -> None:
        for a, attn in enumerate(getattr(block, "attentions", None) or ()):
            name = f"{prefix}.attentions.{a}"
            if getattr(attn, "add_k_proj", None) is None or getattr(attn, "only_cross_attention", False):
                bad.append(f"{name} ({type(attn).__name__}"
                           f"{', cross-attention only' if getattr(attn, 'only_cross_attention', False) else ''})")
            layers.append(AddedKVLayer(len(layers), name, factor))

    for i, b in enumerate(unet.down_blocks):
        add(f"down_blocks.{i}", b, 2 ** i)
    if unet.mid_block is not None:
        add("mid_block", unet.mid_block, 2 ** (n - 1))
    for j, b in enumerate(unet.up_blocks):
        add(f"up_blocks.{j}", b, 2 ** (len(unet.up_blocks) - 1 - j))
    others = sorted(set(unet.attn_processors) - {layer.processor_key for layer in layers})
    if bad or others or not layers:
        raise ModelLoadError(
            f"not an added-KV attention layout: {len(layers)} attention layers in the down/mid/up blocks"
            f"{'; not added-KV: ' + ', '.join(bad[:4]) if bad else ''}"
            f"{'; other attention layers: ' + ', '.join(others[:4]) if others else ''}")
    return layers


def _stock_types() -> tuple[type, ...]:
    from diffusers.models import attention_processor as ap

    return tuple(getattr(ap, n) for n in ("AttnAddedKVProcessor", "AttnAddedKVProcessor2_0") if hasattr(ap, n))


@dataclass
class LayerMaps:
    """One layer's maps: ``cross`` (B, g, g) context mass, ``self_attn`` (B, g², g²)
    renormalised spatial slice (rows = queries, row-stochastic)."""

    layer: AddedKVLayer
    grid: tuple[int, int]
    cross: torch.Tensor
    self_attn: torch.Tensor


class _ProbabilityProcessor:
    """``AttnAddedKVProcessor2_0`` with explicit probabilities; the same output."""

    def __init__(self, capture: "AddedKVCapture", layer: AddedKVLayer, last: bool):
        self.capture, self.layer, self.last = capture, layer, last

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError(f"{self.layer.name}: added-KV capture takes no attention mask")
        residual = hidden_states
        b, c = hidden_states.shape[:2]
        x = hidden_states.view(b, c, -1).transpose(1, 2)                       # (B, N, C)
        if encoder_hidden_states is None:
            context = x
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states
        x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        q = attn.to_q(x)
        k_ctx, v_ctx = attn.add_k_proj(context), attn.add_v_proj(context)
        # Context first, as the stock processor concatenates them.
        k = torch.cat([k_ctx, attn.to_k(x)], dim=1)
        v = torch.cat([v_ctx, attn.to_v(x)], dim=1)
        h = attn.heads
        d = q.shape[-1] // h
        q, k, v = (t.view(b, -1, h, d).transpose(1, 2) for t in (q, k, v))      # (B, h, ·, d)
        work = torch.promote_types(q.dtype, torch.float32)
        # 1/√d: the stock processor calls SDPA without attn.scale, i.e. with SDPA's default.
        logits = torch.matmul(q.to(work), k.to(work).transpose(-1, -2)) * d ** -0.5
        probs = logits.softmax(dim=-1)
        self.capture._record(self.layer, probs.mean(dim=1), k_ctx.shape[1])
        if self.last and self.capture.stop_early:
            raise _Done
        out = torch.matmul(probs.to(v.dtype), v).transpose(1, 2).reshape(b, -1, h * d)
        out = attn.to_out[1](attn.to_out[0](out))
        return out.transpose(-1, -2).reshape(residual.shape) + residual


def split_probabilities(mean_probs: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Head-mean probabilities (B, N, T + N) -> context mass (B, N) and the spatial slice
    with rows renormalised (B, N, N)."""
    cross = mean_probs[..., :tokens].sum(dim=-1)
    spatial = mean_probs[..., tokens:]
    return cross, spatial / spatial.sum(dim=-1, keepdim=True)


class AddedKVCapture(ProcessorCapture):
    """Hooks the added-KV layers ``layers`` (indices in forward order; default all) and
    hands back their maps:

        with AddedKVCapture(unet) as cap:
            maps = cap.run(z_t, t, image_embeds)       # list[LayerMaps], forward order

    Works under autograd when enabled (maps differentiable w.r.t. anything upstream)."""

    def __init__(self, unet, layers: Sequence[int] | None = None, *, stop_early: bool = True):
        self.unet = unet
        every = added_kv_layers(unet)
        chosen = range(len(every)) if layers is None else sorted(set(layers))
        bad = [i for i in chosen if not 0 <= i < len(every)]
        if bad:
            raise ValueError(f"layer indices must lie in 0..{len(every) - 1}, got {bad}")
        self.layers = tuple(every[i] for i in chosen)
        if not self.layers:
            raise ValueError("nothing to capture: no layers")
        self.stop_early = stop_early
        self._latent_hw = (0, 0)
        self._maps: list[LayerMaps] = []
        self.output: torch.Tensor | None = None

    @property
    def last_layer(self) -> AddedKVLayer:
        return self.layers[-1]

    def __enter__(self) -> "AddedKVCapture":
        current = self.unet.attn_processors
        procs = {}
        for layer in self.layers:
            proc = current[layer.processor_key]
            if type(proc) not in _stock_types():
                raise NotImplementedError(
                    f"added-KV capture cannot replace the processor {type(proc).__qualname__} of {layer.name}: "
                    "it only reproduces diffusers' AttnAddedKVProcessor(2_0)")
            procs[layer.processor_key] = _ProbabilityProcessor(self, layer, last=layer == self.last_layer)
        self._install(procs)
        return self

    def _record(self, layer: AddedKVLayer, mean_probs: torch.Tensor, tokens: int) -> None:
        lh, lw = self._latent_hw
        gh, gw = -(-lh // layer.factor), -(-lw // layer.factor)
        n = mean_probs.shape[1]
        if gh * gw != n or mean_probs.shape[2] != tokens + n:
            raise RuntimeError(f"{layer.name}: {n} positions and {mean_probs.shape[2]} keys, expected {gh}x{gw} "
                               f"and {tokens} context tokens before them")
        cross, spatial = split_probabilities(mean_probs, tokens)
        self._maps.append(LayerMaps(layer, (gh, gw), cross.reshape(-1, gh, gw), spatial))

    def run(self, latents: torch.Tensor, timestep, image_embeds: torch.Tensor) -> list[LayerMaps]:
        """One UNet forward on ``latents`` conditioned on ``image_embeds`` (no text, no
        guidance: ``encoder_hidden_states=None``), stopped after the last captured layer
        (``stop_early``; otherwise ``self.output`` holds the UNet output)."""
        self._maps = []
        self.output = self._forward(latents, timestep, encoder_hidden_states=None,
                                    added_cond_kwargs={"image_embeds": image_embeds})
        maps, self._maps = self._maps, []
        if [m.layer for m in maps] != list(self.layers):
            raise RuntimeError(f"captured {len(maps)} of {len(self.layers)} layers")
        return maps
