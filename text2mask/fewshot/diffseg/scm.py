"""SCM, the spatial control module [P §4.4, Fig. 4] (DIFFSEG.md "SCM"; O7).

The query's edge map and the frozen UNet's own down-path features steer the up path's
attention, ControlNet-style, in the same forward pass and without a diffusers fork:

    e    = EdgeEncoder(I_l)                       (B, 256, h, w)   shared, h = R / 8
    f_ℓ  = up(conv1×1_ℓ(D_ℓ))                     (B, 256, h, w)   D_ℓ: last full-resolution
                                                                   output of the down block at level ℓ
    u    = Linear(512→256)([e ; f_ℓ])             per pixel, shared across levels
    u    = u + MLP(LN(u))                          256 → 1024 → 256, GELU, shared
    c_ℓ  = Linear(256→256)(u)                      shared
    skip = skip + Z_ℓj(area-pool(c_ℓ))             every skip tensor the level's up block reads

Levels are the up blocks with attention (the 32², 16², 8² grids at a 64² latent; their
down counterparts are down_blocks[1..3]). Z_ℓj are zero-initialised 1×1 convolutions
(12 in Kandinsky 2.2: 3 levels × 4 skips), so an untrained SCM leaves every map exactly
unchanged. The skips are edited by ``register_forward_pre_hook(with_kwargs=True)`` on
the up blocks (``res_hidden_states_tuple``), the down features read by forward hooks on
the down blocks. SCM changes only the up path: the down and mid maps never move, and a
loss on the maps sends gradients to SCM and none to the frozen UNet, whose down and mid
blocks build no autograd graph at all (nothing there requires grad).

conv1×1 then bilinear upsampling equals upsampling then conv1×1 (both linear, one per
pixel, one per channel; the bias is a constant map), so the cheaper order is used.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import ModelLoadError

EDGE_WIDTHS = (32, 64, 128, 256)     # edge encoder: Conv 1→32, then 3 stride-2 convs (÷8)
WIDTH = 256                          # shared core width
MLP_WIDTH = 1024


@dataclass(frozen=True)
class Level:
    """One controlled up block: its index, the down block it reads, the channels."""

    up_block: int
    down_block: int
    source_channels: int
    skip_channels: tuple[int, ...]    # in res_hidden_states_tuple order


def control_levels(unet) -> list[Level]:
    """The up blocks with attention and the skips each reads, from the UNet's config."""
    cfg = unet.config
    lpb = cfg.layers_per_block
    if not isinstance(lpb, int):
        raise ModelLoadError(f"SCM needs one layers_per_block for every level, got {lpb!r}")
    out_ch = list(cfg.block_out_channels)
    n = len(out_ch)
    skips = [out_ch[0]]                              # conv_in's output
    for i in range(n):
        skips += [out_ch[i]] * lpb + ([out_ch[i]] if i < n - 1 else [])
    levels = []
    for j, block in enumerate(unet.up_blocks):
        take = len(block.resnets)
        read, skips = skips[-take:], skips[:-take]
        if getattr(block, "attentions", None):
            i = n - 1 - j
            levels.append(Level(j, i, out_ch[i], tuple(read)))
    if not levels:
        raise ModelLoadError("SCM: the UNet has no up block with attention")
    return levels


class EdgeEncoder(torch.nn.Module):
    """Conv3×3 1→32 + ReLU, then 3 × (Conv3×3 stride 2 + ReLU): (B, 1, R, R) -> (B, 256, R/8, R/8)."""

    def __init__(self):
        super().__init__()
        layers = [torch.nn.Conv2d(1, EDGE_WIDTHS[0], 3, padding=1), torch.nn.ReLU()]
        for cin, cout in zip(EDGE_WIDTHS, EDGE_WIDTHS[1:]):
            layers += [torch.nn.Conv2d(cin, cout, 3, stride=2, padding=1), torch.nn.ReLU()]
        self.net = torch.nn.Sequential(*layers)

    def forward(self, edges: torch.Tensor) -> torch.Tensor:
        return self.net(edges)


def _zero_conv(cin: int, cout: int) -> torch.nn.Conv2d:
    conv = torch.nn.Conv2d(cin, cout, 1)
    torch.nn.init.zeros_(conv.weight)
    torch.nn.init.zeros_(conv.bias)
    return conv


class SpatialControl(torch.nn.Module):
    def __init__(self, levels: list[Level]):
        super().__init__()
        self.levels = tuple(levels)
        self.edge_encoder = EdgeEncoder()
        self.adapters = torch.nn.ModuleList(torch.nn.Conv2d(lv.source_channels, WIDTH, 1) for lv in levels)
        self.fuse = torch.nn.Linear(EDGE_WIDTHS[-1] + WIDTH, WIDTH)
        self.norm = torch.nn.LayerNorm(WIDTH)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(WIDTH, MLP_WIDTH), torch.nn.GELU(),
                                       torch.nn.Linear(MLP_WIDTH, WIDTH))
        self.out = torch.nn.Linear(WIDTH, WIDTH)
        self.zero = torch.nn.ModuleList(torch.nn.ModuleList(_zero_conv(WIDTH, c) for c in lv.skip_channels)
                                        for lv in levels)

    def describe(self) -> dict:
        return {"edge_widths": list(EDGE_WIDTHS), "width": WIDTH, "mlp_width": MLP_WIDTH,
                "levels": [{"up_block": lv.up_block, "down_block": lv.down_block,
                            "skip_channels": list(lv.skip_channels)} for lv in self.levels]}

    def control(self, level: int, edge_features: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """c_ℓ (B, 256, h, w) from the edge features (B, 256, h, w) and D_ℓ (B, C_ℓ, g, g)."""
        f = self.adapters[level](source.to(self.fuse.weight.dtype))
        f = F.interpolate(f, size=edge_features.shape[-2:], mode="bilinear", align_corners=False)
        u = self.fuse(torch.cat([edge_features, f], dim=1).permute(0, 2, 3, 1))      # (B, h, w, 256)
        u = u + self.mlp(self.norm(u))
        return self.out(u).permute(0, 3, 1, 2)

    def injections(self, level: int, c: torch.Tensor, skips: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Every skip + Z_ℓj(area-pool(c_ℓ) to the skip's grid)."""
        out = []
        for z, s in zip(self.zero[level], skips):
            pooled = F.adaptive_avg_pool2d(c, s.shape[-2:])
            out.append(s + z(pooled).to(s.dtype))
        return tuple(out)

    @contextmanager
    def attached(self, unet, edges: torch.Tensor):
        """Hooks on ``unet`` for one forward with the query edge maps ``edges`` (B, 1, R, R)
        in [0, 1]: down-block outputs are read, the controlled up blocks' skips edited."""
        if len(self.zero) != len(self.levels) or [lv.up_block for lv in control_levels(unet)] != \
                [lv.up_block for lv in self.levels]:
            raise ModelLoadError("this SCM was built for another UNet layout")
        e = self.edge_encoder(edges.to(self.fuse.weight.dtype))
        sources: dict[int, torch.Tensor] = {}
        lpb = unet.config.layers_per_block
        handles = []

        def read(index: int):
            def hook(module, args, output):
                # output = (hidden states, res samples); the first lpb res samples are at the
                # block's full resolution, the last of them is D_ℓ.
                sources[index] = output[1][lpb - 1]
            return hook

        def edit(level: int, down: int):
            def hook(module, args, kwargs):
                if "res_hidden_states_tuple" not in kwargs:
                    raise RuntimeError("SCM expects the UNet to call its up blocks with keyword arguments")
                c = self.control(level, e, sources.pop(down))
                kwargs = dict(kwargs)
                kwargs["res_hidden_states_tuple"] = self.injections(level, c, kwargs["res_hidden_states_tuple"])
                return args, kwargs
            return hook

        try:
            for k, lv in enumerate(self.levels):
                handles.append(unet.down_blocks[lv.down_block].register_forward_hook(read(lv.down_block)))
                handles.append(unet.up_blocks[lv.up_block].register_forward_pre_hook(edit(k, lv.down_block),
                                                                                       with_kwargs=True))
            yield self
        finally:
            for h in handles:
                h.remove()
