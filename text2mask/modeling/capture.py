"""Stage 2 — capture attention probabilities from chosen UNet transformer blocks.

SD v1's UNet has 16 transformer blocks; we number them in forward order (down, mid, up),
which is NOT ``named_modules()`` order (that lists the mid block last). Only the hooked
blocks compute explicit probabilities; every other block keeps diffusers' fused
attention. Once the last hooked block has run, the rest of the UNet cannot change any
captured map, so the forward pass is stopped there.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

CROSS_BLOCKS = (4, 5, 6, 7, 8)
SELF_BLOCK = 11


@dataclass(frozen=True)
class Block:
    index: int     # forward order 0..15
    name: str      # diffusers module path of the Transformer2DModel
    factor: int    # spatial downsampling w.r.t. the latent (1, 2, 4 or 8)

    def processor_key(self, kind: str) -> str:
        return f"{self.name}.transformer_blocks.0.{kind}.processor"


def transformer_blocks(unet) -> list[Block]:
    """The UNet's transformer blocks in forward order, with their resolution."""
    blocks: list[Block] = []
    n_down = len(unet.down_blocks)

    def add(prefix: str, module, factor: int) -> None:
        for a in range(len(getattr(module, "attentions", None) or ())):
            blocks.append(Block(len(blocks), f"{prefix}.attentions.{a}", factor))

    for i, b in enumerate(unet.down_blocks):
        add(f"down_blocks.{i}", b, 2 ** i)
    add("mid_block", unet.mid_block, 2 ** (n_down - 1))
    for j, b in enumerate(unet.up_blocks):
        add(f"up_blocks.{j}", b, 2 ** (len(unet.up_blocks) - 1 - j))
    return blocks


class _Done(Exception):
    """Raised after the last hooked block: the remaining UNet layers are not needed."""


class _ProbabilityProcessor:
    """Attention with explicit softmax(QK^T/sqrt(d)) probabilities (in fp32), averaged
    over heads and handed to the store. Same output as the fused processor."""

    def __init__(self, store: "AttentionCapture", block: Block, kind: str, last: bool):
        self.store, self.block, self.kind, self.last = store, block, kind, last

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3:
            raise NotImplementedError("attention capture supports SD v1 transformer blocks only")
        residual = hidden_states
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b = hidden_states.shape[0]
        q = attn.to_q(hidden_states)
        k = attn.to_k(context)
        v = attn.to_v(context)
        h = attn.heads
        d = q.shape[-1] // h
        q, k, v = (t.view(b, -1, h, d).transpose(1, 2) for t in (q, k, v))
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            logits = logits + attn.prepare_attention_mask(attention_mask, k.shape[2], b).view(b, h, -1, k.shape[2])
        probs = logits.softmax(dim=-1)
        self.store._record(self.block, self.kind, probs.mean(dim=1))
        if self.last:
            raise _Done
        out = torch.matmul(probs.to(v.dtype), v).transpose(1, 2).reshape(b, -1, h * d)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@dataclass
class CapturedMaps:
    """Head-averaged attention of one forward pass.

    cross: {block index: (B, h, w, tokens)} from ``attn2``; self_attn: (B, N, N) from
    ``attn1`` of the self block, rows = queries (row-stochastic); grid: its (h, w)."""

    cross: dict[int, torch.Tensor] = field(default_factory=dict)
    self_attn: torch.Tensor | None = None
    grid: tuple[int, int] = (0, 0)


class AttentionCapture:
    """Context manager in the spirit of DAAM's ``trace``: hooks the cross-attention of
    ``cross_blocks`` and the self-attention of ``self_block`` and hands back the maps.

        with AttentionCapture(unet) as cap:
            maps = cap.run(latents, t, text_embeddings)
    """

    def __init__(self, unet, cross_blocks=CROSS_BLOCKS, self_block=SELF_BLOCK):
        self.unet = unet
        blocks = transformer_blocks(unet)
        if len(blocks) != 16:
            raise ValueError(f"expected the 16 transformer blocks of SD v1's UNet, found {len(blocks)}")
        self.cross_blocks = tuple(blocks[i] for i in cross_blocks)
        self.self_block = blocks[self_block]
        self._latent_hw = (0, 0)
        self._maps = CapturedMaps()
        self._saved = None

    def __enter__(self) -> "AttentionCapture":
        self._saved = dict(self.unet.attn_processors)
        hooked = [(b, "attn2") for b in self.cross_blocks] + [(self.self_block, "attn1")]
        # attn1 runs before attn2 inside a block.
        last = max(hooked, key=lambda bk: (bk[0].index, bk[1]))
        procs = dict(self._saved)
        for b, kind in hooked:
            procs[b.processor_key(kind)] = _ProbabilityProcessor(self, b, kind, last=(b, kind) == last)
        self.unet.set_attn_processor(procs)
        return self

    def __exit__(self, *exc) -> None:
        self.unet.set_attn_processor(self._saved)

    def _grid(self, block: Block, n: int) -> tuple[int, int]:
        lh, lw = self._latent_hw
        gh, gw = -(-lh // block.factor), -(-lw // block.factor)
        if gh * gw != n:
            raise RuntimeError(f"block {block.index} ({block.name}) has {n} positions, expected {gh}x{gw}")
        return gh, gw

    def _record(self, block: Block, kind: str, probs: torch.Tensor) -> None:
        gh, gw = self._grid(block, probs.shape[1])
        if kind == "attn2":
            self._maps.cross[block.index] = probs.reshape(probs.shape[0], gh, gw, probs.shape[-1])
        else:
            self._maps.self_attn = probs
            self._maps.grid = (gh, gw)

    def run(self, latents: torch.Tensor, timestep, text_embeddings: torch.Tensor) -> CapturedMaps:
        """One UNet forward (stopped after the last hooked block); returns the maps."""
        self._latent_hw = tuple(latents.shape[-2:])
        self._maps = CapturedMaps()
        try:
            self.unet(latents, timestep, encoder_hidden_states=text_embeddings)
        except _Done:
            pass
        maps, self._maps = self._maps, CapturedMaps()
        missing = [b.index for b in self.cross_blocks if b.index not in maps.cross]
        if missing or maps.self_attn is None:
            raise RuntimeError(f"attention of blocks {missing or [self.self_block.index]} was not captured")
        return maps

