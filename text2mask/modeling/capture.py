"""Capture attention from chosen UNet transformer blocks (SD 1.x, 2.x and SDXL).

A transformer block is one ``Transformer2DModel`` of the UNet; we number them in forward
order (down, mid, up), which is NOT ``named_modules()`` order (that lists the mid block
last). The UNets of SD 1.x and 2.x have 16 blocks of one transformer layer each; the two
families differ only inside a block (head counts per block, linear instead of conv
projections), which the capture does not depend on. SDXL's has 11 blocks of 2 or 10
layers (``CaptureLayout``; the family's layout is chosen from the UNet config).

Only the hooked attention layers compute explicit probabilities

    P = softmax(Q K^T / sqrt(d))      per head, in fp32 (or float64); handed over as the head mean

every other layer keeps diffusers' fused attention. A block's map is the mean of its
layers' head-mean maps (one layer in SD 1.x/2.x: that layer's map, unchanged). A hooked
layer returns the same output as the processor it replaced, so the activations
downstream do not change. Once the last hooked layer has run, the rest of the UNet
cannot change any captured map: with ``stop_early`` the forward pass is stopped there.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from ..errors import ModelLoadError

CROSS_BLOCKS = (4, 5, 6, 7, 8)
SELF_BLOCK = 11
NUM_BLOCKS = 16
LAYOUT = ("SD 1.x/2.x UNet: 16 transformer blocks (6 down, 1 mid, 9 up), one transformer layer "
          "each, with a self-attention attn1 and a cross-attention attn2")


@dataclass(frozen=True)
class CaptureLayout:
    """Where a family's UNet keeps the attention the methods read: the resolution of each
    transformer block in forward order, whether a block must hold exactly one transformer
    layer, and the WSSS default blocks (the paper's choice, or its translation)."""

    factors: tuple[int, ...]        # downsampling w.r.t. the latent of each block, forward order
    single_layer: bool              # every block holds one transformer layer (SD 1.x/2.x)
    cross_blocks: tuple[int, ...]   # WSSS: cross-attention blocks averaged into Cross
    self_blocks: tuple[int, ...]    # WSSS: self-attention blocks averaged into Self
    description: str

    @property
    def num_blocks(self) -> int:
        return len(self.factors)


# ALGORITHM.md section 3: blocks 4-8 (latent/4 and /8) for Cross, block 11 (latent/2) for Self.
SD_LAYOUT = CaptureLayout(factors=(1, 1, 2, 2, 4, 4, 8, 4, 4, 4, 2, 2, 2, 1, 1, 1), single_layer=True,
                          cross_blocks=CROSS_BLOCKS, self_blocks=(SELF_BLOCK,), description=LAYOUT)


@dataclass(frozen=True)
class Block:
    index: int     # forward order 0..15 (SD 1.x/2.x), 0..10 (SDXL)
    name: str      # diffusers module path of the Transformer2DModel
    factor: int    # spatial downsampling w.r.t. the latent (1, 2, 4 or 8)
    layers: int = 1  # transformer layers (BasicTransformerBlock) in it: 1 in SD 1.x/2.x, 2 or 10 in SDXL

    def processor_key(self, kind: str, layer: int = 0) -> str:
        return f"{self.name}.transformer_blocks.{layer}.{kind}.processor"


def transformer_blocks(unet) -> list[Block]:
    """The UNet's transformer blocks in forward order, with their resolution."""
    blocks: list[Block] = []
    n_down = len(unet.down_blocks)

    def add(prefix: str, module, factor: int) -> None:
        for a, t in enumerate(getattr(module, "attentions", None) or ()):
            blocks.append(Block(len(blocks), f"{prefix}.attentions.{a}", factor,
                                len(getattr(t, "transformer_blocks", None) or ())))

    for i, b in enumerate(unet.down_blocks):
        add(f"down_blocks.{i}", b, 2 ** i)
    if unet.mid_block is not None:
        add("mid_block", unet.mid_block, 2 ** (n_down - 1))
    for j, b in enumerate(unet.up_blocks):
        add(f"up_blocks.{j}", b, 2 ** (len(unet.up_blocks) - 1 - j))
    return blocks


def layout_of(unet) -> CaptureLayout:
    """The capture layout of the UNet's family (from its config; SD 1.x/2.x's unless the
    config is SDXL's)."""
    from .families import family_of_unet

    return family_of_unet(unet.config).layout


def check_layout(unet, layout: CaptureLayout | None = None) -> list[Block]:
    """The blocks of a UNet with its family's layout (SD 1.x/2.x: 16 blocks of one layer;
    SDXL: 11 blocks of any depth at latent/2 and /4), or ModelLoadError describing what was
    found (e.g. an SDXL-shaped UNet without SDXL's conditioning: 11 blocks, 2 or 10 layers)."""
    layout = layout or layout_of(unet)
    blocks = transformer_blocks(unet)
    found = []
    for b in blocks:
        layers = unet.get_submodule(b.name).transformer_blocks
        crossing = [getattr(t, "attn2", None) is not None and t.attn2.is_cross_attention for t in layers]
        if (layout.single_layer and len(layers) != 1) or not layers or not all(crossing):
            found.append(f"{b.name}: {len(layers)} transformer layer(s)"
                         f"{'' if all(crossing) else ', no cross-attention'}")
    factors = tuple(b.factor for b in blocks)
    if len(blocks) != layout.num_blocks or found or factors != layout.factors:
        layers = ", ".join(found[:4]) + (" ..." if len(found) > 4 else "")
        shape = "" if len(blocks) != layout.num_blocks or factors == layout.factors else (
            f" at latent/{list(factors)}")
        raise ModelLoadError(
            f"unknown UNet layout for attention capture: found {len(blocks)} transformer blocks{shape} "
            f"(down block types {list(unet.config.down_block_types)})"
            f"{'; ' + layers if layers else ''}. Supported: {layout.description} (SD3, Flux and others are not).")
    return blocks


@contextmanager
def swap_processors(unet, processors: dict) -> Iterator[dict]:
    """Install ``{processor_key: processor}`` on the UNet and restore the original processors
    on exit (also after an error). Yields the originals."""
    saved = dict(unet.attn_processors)
    unknown = sorted(set(processors) - set(saved))
    if unknown:
        raise KeyError(f"no attention layer {unknown[0]!r} in this UNet ({len(unknown)} unknown keys)")
    unet.set_attn_processor({**saved, **processors})
    try:
        yield saved
    finally:
        unet.set_attn_processor(saved)


class _Done(Exception):
    """Raised after the last hooked layer: the remaining UNet layers are not needed."""


def _stock_processor_types() -> tuple[type, ...]:
    """diffusers' processors that project with the layer's own to_q/to_k/to_v/to_out."""
    from diffusers.models import attention_processor as ap

    names = ("AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "AttnProcessorNPU",
             "SlicedAttnProcessor", "FusedAttnProcessor2_0")
    return tuple(getattr(ap, n) for n in names if hasattr(ap, n))


def _custom_diffusion_types() -> tuple[type, ...]:
    from diffusers.models import attention_processor as ap

    names = ("CustomDiffusionAttnProcessor", "CustomDiffusionAttnProcessor2_0",
             "CustomDiffusionXFormersAttnProcessor")
    return tuple(getattr(ap, n) for n in names if hasattr(ap, n))


def _projections(processor, key: str):
    """The weights a replaced processor projects with: None for the layer's own, the
    processor itself for Custom Diffusion; any other processor is refused."""
    # Exact types: a subclass may compute something else.
    if type(processor) in _stock_processor_types():
        return None
    if type(processor) in _custom_diffusion_types():
        return processor
    raise NotImplementedError(
        f"attention capture cannot replace the processor {type(processor).__module__}."
        f"{type(processor).__qualname__} of {key}: it only knows diffusers' stock processors and "
        f"Custom Diffusion's; merge its weights into the UNet first")


class _ProbabilityProcessor:
    """Attention with explicit softmax(QK^T/sqrt(d)) probabilities (in fp32), averaged
    over heads and handed to the store. Same output as the processor it replaces."""

    def __init__(self, store: "AttentionCapture", block: Block, kind: str, last: bool, custom=None):
        self.store, self.block, self.kind, self.last, self.custom = store, block, kind, last, custom

    def _qkv(self, attn, hidden_states, context, cross: bool):
        cd = self.custom
        q = cd.to_q_custom_diffusion(hidden_states) if cd is not None and cd.train_q_out else attn.to_q(hidden_states)
        if cd is not None and cd.train_kv:
            # As diffusers' CustomDiffusionAttnProcessor: states in the custom weights' dtype,
            # results in the query weights' dtype; the first (start) token's K/V get no gradient.
            k = cd.to_k_custom_diffusion(context.to(cd.to_k_custom_diffusion.weight.dtype)).to(attn.to_q.weight.dtype)
            v = cd.to_v_custom_diffusion(context.to(cd.to_v_custom_diffusion.weight.dtype)).to(attn.to_q.weight.dtype)
            if cross:
                k = torch.cat([k[:, :1].detach(), k[:, 1:]], dim=1)
                v = torch.cat([v[:, :1].detach(), v[:, 1:]], dim=1)
        else:
            k, v = attn.to_k(context), attn.to_v(context)
        return q, k, v

    def _out(self, attn, out):
        cd = self.custom
        if cd is not None and cd.train_q_out:
            return cd.to_out_custom_diffusion[1](cd.to_out_custom_diffusion[0](out))
        return attn.to_out[1](attn.to_out[0](out))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        unsupported = [n for n in ("spatial_norm", "group_norm", "norm_cross", "norm_q", "norm_k")
                       if getattr(attn, n, None) is not None]
        if unsupported or hidden_states.ndim != 3:
            raise NotImplementedError(
                f"attention capture supports SD 1.x/2.x/SDXL transformer blocks only; {self.block.name} "
                f"{self.kind} has {', '.join(unsupported) or f'{hidden_states.ndim}-d hidden states'}")
        residual = hidden_states
        cross = encoder_hidden_states is not None
        context = encoder_hidden_states if cross else hidden_states
        b = hidden_states.shape[0]
        q, k, v = self._qkv(attn, hidden_states, context, cross)
        h = attn.heads
        d = q.shape[-1] // h
        q, k, v = (t.view(b, -1, h, d).transpose(1, 2) for t in (q, k, v))
        # At least fp32 (fp16/bf16 UNets too); a float64 UNet stays float64.
        work = torch.promote_types(q.dtype, torch.float32)
        logits = torch.matmul(q.to(work), k.to(work).transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            logits = logits + attn.prepare_attention_mask(attention_mask, k.shape[2], b).view(b, h, -1, k.shape[2])
        probs = logits.softmax(dim=-1)
        self.store._record(self.block, self.kind, probs.mean(dim=1), logits)
        if self.last and self.store.stop_early:
            raise _Done
        out = torch.matmul(probs.to(v.dtype), v).transpose(1, 2).reshape(b, -1, h * d)
        out = self._out(attn, out)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@dataclass
class CapturedMaps:
    """Head-averaged attention of one forward pass.

    cross: {block index: (B, h, w, tokens)} probabilities from ``attn2`` (a block of
    several transformer layers: the mean of its layers' maps); cross_logits: {block index:
    (B, h, w, K)} head-mean pre-softmax logits Q K^T / sqrt(d) of the K requested token
    columns (layer mean likewise); self_attn: (B, N, N) from ``attn1``, averaged over the
    layers of the self blocks, rows = queries (row-stochastic); grid: its (h, w); output:
    the UNet output (``stop_early=False`` only)."""

    cross: dict[int, torch.Tensor] = field(default_factory=dict)
    cross_logits: dict[int, torch.Tensor] = field(default_factory=dict)
    self_attn: torch.Tensor | None = None
    grid: tuple[int, int] = (0, 0)
    output: torch.Tensor | None = None


def _layer_mean(parts: list[torch.Tensor]) -> torch.Tensor:
    """One layer's map as it is (SD 1.x/2.x: the bytes of that layer), several averaged."""
    return parts[0] if len(parts) == 1 else torch.stack(parts).mean(dim=0)


class ProcessorCapture:
    """What every capture shares (``AttentionCapture``, ``added_kv.AddedKVCapture``): its
    processors are installed on ``self.unet`` for the ``with`` block only, and one UNet
    forward inside it may be stopped after the last hooked layer (``_Done``)."""

    unet = None
    _swap = None

    def _install(self, processors: dict) -> None:
        self._swap = swap_processors(self.unet, processors)
        self._swap.__enter__()

    def __exit__(self, *exc) -> None:
        swap, self._swap = self._swap, None
        swap.__exit__(*exc)

    def _forward(self, latents: torch.Tensor, timestep, **unet_kwargs) -> torch.Tensor | None:
        """The UNet's output, or None when the pass stopped after the last hooked layer."""
        if self._swap is None:
            name = type(self).__name__
            raise RuntimeError(f"{name}.run() must be called inside `with {name}(...)`")
        self._latent_hw = tuple(latents.shape[-2:])
        try:
            return self.unet(latents, timestep, **unet_kwargs).sample
        except _Done:
            return None


class AttentionCapture(ProcessorCapture):
    """Context manager in the spirit of DAAM's ``trace``: hooks the cross-attention of
    ``cross_blocks`` and the self-attention of ``self_blocks`` (every transformer layer of
    each) and hands back the maps.

        with AttentionCapture(unet, (4, 5, 6, 7, 8), (11,)) as cap:
            maps = cap.run(latents, t, text_embeddings)

    ``run`` takes SDXL's ``added_cond_kwargs`` (pooled text embedding, time ids) too.
    Works under autograd when the caller enables it (maps and output are differentiable).
    """

    def __init__(self, unet, cross_blocks: Sequence[int] = CROSS_BLOCKS,
                 self_blocks: Sequence[int] = (SELF_BLOCK,), *,
                 cross_logits_tokens: Sequence[int] | None = None, stop_early: bool = True):
        self.unet = unet
        blocks = check_layout(unet)
        bad = [i for i in (*cross_blocks, *self_blocks) if not 0 <= i < len(blocks)]
        if bad:
            raise ValueError(f"block indices must lie in 0..{len(blocks) - 1}, got {bad}")
        self.cross_blocks = tuple(blocks[i] for i in sorted(set(cross_blocks)))
        self.self_blocks = tuple(blocks[i] for i in sorted(set(self_blocks)))
        if len({b.factor for b in self.self_blocks}) > 1:
            raise ValueError("self blocks are averaged and must share one grid; got blocks "
                             f"{[(b.index, f'latent/{b.factor}') for b in self.self_blocks]}")
        if not self.cross_blocks and not self.self_blocks:
            raise ValueError("nothing to capture: no cross and no self blocks")
        self.logit_tokens = None if cross_logits_tokens is None else torch.as_tensor(
            list(cross_logits_tokens), dtype=torch.long)
        self.stop_early = stop_early
        self._latent_hw = (0, 0)
        self._reset()

    def _reset(self) -> None:
        self._maps = CapturedMaps()
        self._cross_parts: dict[int, list[torch.Tensor]] = {}
        self._logit_parts: dict[int, list[torch.Tensor]] = {}
        self._self_parts: list[torch.Tensor] = []

    def __enter__(self) -> "AttentionCapture":
        hooked = [(b, layer, "attn2") for b in self.cross_blocks for layer in range(b.layers)] + [
            (b, layer, "attn1") for b in self.self_blocks for layer in range(b.layers)]
        # Forward order: block, then layer; attn1 runs before attn2 inside a layer.
        last = max(hooked, key=lambda h: (h[0].index, h[1], h[2]))
        current = self.unet.attn_processors
        procs = {}
        for b, layer, kind in hooked:
            key = b.processor_key(kind, layer)
            custom = _projections(current[key], key)
            procs[key] = _ProbabilityProcessor(self, b, kind, last=(b, layer, kind) == last, custom=custom)
        self._install(procs)
        return self

    def _grid(self, block: Block, n: int) -> tuple[int, int]:
        lh, lw = self._latent_hw
        gh, gw = -(-lh // block.factor), -(-lw // block.factor)
        if gh * gw != n:
            raise RuntimeError(f"block {block.index} ({block.name}) has {n} positions, expected {gh}x{gw}")
        return gh, gw

    def _record(self, block: Block, kind: str, probs: torch.Tensor, logits: torch.Tensor) -> None:
        gh, gw = self._grid(block, probs.shape[1])
        if kind == "attn2":
            self._cross_parts.setdefault(block.index, []).append(
                probs.reshape(probs.shape[0], gh, gw, probs.shape[-1]))
            if self.logit_tokens is not None:
                cols = logits[..., self.logit_tokens.to(logits.device)].mean(dim=1)
                self._logit_parts.setdefault(block.index, []).append(
                    cols.reshape(cols.shape[0], gh, gw, cols.shape[-1]))
        else:
            self._self_parts.append(probs)
            self._maps.grid = (gh, gw)

    def run(self, latents: torch.Tensor, timestep, text_embeddings: torch.Tensor,
            added_cond_kwargs: dict | None = None) -> CapturedMaps:
        """One UNet forward (stopped after the last hooked layer if ``stop_early``); returns the maps."""
        self._reset()
        extra = {} if added_cond_kwargs is None else {"added_cond_kwargs": added_cond_kwargs}
        self._maps.output = self._forward(latents, timestep, encoder_hidden_states=text_embeddings, **extra)
        maps, cross, logits, parts = self._maps, self._cross_parts, self._logit_parts, self._self_parts
        self._reset()
        for b in self.cross_blocks:
            if len(cross.get(b.index, ())) == b.layers:
                maps.cross[b.index] = _layer_mean(cross[b.index])
                if b.index in logits:
                    maps.cross_logits[b.index] = _layer_mean(logits[b.index])
        if parts:
            maps.self_attn = _layer_mean(parts)
        missing = [b.index for b in self.cross_blocks if b.index not in maps.cross]
        if len(parts) != sum(b.layers for b in self.self_blocks):
            missing += [b.index for b in self.self_blocks]
        if missing:
            raise RuntimeError(f"attention of blocks {missing} was not captured")
        return maps
