"""PAM, the perceptual attention module [P §4.3, eq. 8, 12] (DIFFSEG.md stage 6; O6).

Tokens are the h·w pixels (4096 at R = 512) of the clean query latent L_q, of the
k-shot support latent L_s (4-d each) and of the fused map M_a (1-d); width d = 128, one
head as eq. 12:

    X  = Linear(4→d)(L_q)
    L1 = Att1(Q = X, K = V = Linear(4→d)(L_s))
    L2 = Att2(Q = X + P, K = Linear(1→d)(M_a) + P, V = Linear(1→d)(M_a))
    L3 = (X + L1 + L2) / 3
    L4 = L3 + Att3(Q = L3 + P, K = L3 + P, V = L3)
    L_pre = Conv1×1(d→4)(ReLU(Conv3×3(d→d)(L4)))                   (B, 4, h, w)

with pre-LayerNorm on every attention input (the codes P added after it) and
Att(Q, K, V) = W_o softmax(W_q Q (W_k K)ᵀ / √d) W_v V.

P are fixed 2-d sin-cos position codes (our choice; the paper is silent). Without them
a linear embedding of a scalar gives logits q_i·(w a_j + b), which depend on j only
through a_j, so Att2 would be blind to *where* M_a is high (invariant to any permutation
of M_a's pixels), yet the paper finds Att2 the most useful part (Table 5). Att1 gets no
codes: its keys are another photo's pixels. The block ends linear, not ReLU: MoVQ
latents are signed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

WIDTH = 128
POSITION_BASE = 10_000.0


def sincos_positions(h: int, w: int, dim: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """(h·w, dim) fixed 2-d sin-cos codes, row-major: dim/2 for the row index, dim/2 for
    the column, each half [sin | cos] over dim/4 geometric frequencies (as MAE)."""
    if dim % 4:
        raise ValueError(f"position codes need a width divisible by 4, got {dim}")
    q = dim // 4
    freq = 1.0 / POSITION_BASE ** (torch.arange(q, dtype=torch.float64, device=device) / q)

    def axis(n):
        a = torch.arange(n, dtype=torch.float64, device=device)[:, None] * freq
        return torch.cat([a.sin(), a.cos()], dim=1)                          # (n, dim/2)

    rows, cols = axis(h), axis(w)
    codes = torch.cat([rows[:, None, :].expand(h, w, -1), cols[None, :, :].expand(h, w, -1)], dim=-1)
    return codes.reshape(h * w, dim).to(dtype)


class Attention(torch.nn.Module):
    """One-head attention with pre-LayerNorm on its inputs and optional position codes on Q and K."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm_q, self.norm_kv = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.to_out = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        qx, ky = self.norm_q(x), self.norm_kv(y)
        vy = ky
        if positions is not None:
            qx, ky = qx + positions, ky + positions
        q, k, v = self.to_q(qx), self.to_k(ky), self.to_v(vy)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], scale=1 / math.sqrt(q.shape[-1]))
        return self.to_out(out[:, 0])


class PerceptualAttention(torch.nn.Module):
    def __init__(self, latent_channels: int = 4, width: int = WIDTH, positions: bool = True):
        super().__init__()
        self.width, self.positions = width, positions
        self.embed_query = torch.nn.Linear(latent_channels, width)
        self.embed_support = torch.nn.Linear(latent_channels, width)
        self.embed_map = torch.nn.Linear(1, width)
        self.att1, self.att2, self.att3 = Attention(width), Attention(width), Attention(width)
        self.head = torch.nn.Sequential(torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(width, latent_channels, 1))

    def describe(self) -> dict:
        return {"width": self.width, "heads": 1, "positions": self.positions}

    def forward(self, query_latent: torch.Tensor, support_latent: torch.Tensor, m_a: torch.Tensor) -> torch.Tensor:
        """L_q (B, 4, h, w), L_s (B, 4, h, w), M_a (B, 1, h, w) -> L_pre (B, 4, h, w)."""
        b, _, h, w = query_latent.shape
        dt = self.embed_query.weight.dtype

        def tokens(t):
            return t.to(dt).flatten(2).transpose(1, 2)                         # (B, h·w, C)

        pos = sincos_positions(h, w, self.width, dt, query_latent.device) if self.positions else None
        x = self.embed_query(tokens(query_latent))
        l1 = self.att1(x, self.embed_support(tokens(support_latent)))
        l2 = self.att2(x, self.embed_map(tokens(m_a)), pos)
        l3 = (x + l1 + l2) / 3
        l4 = l3 + self.att3(l3, l3, pos)
        return self.head(l4.transpose(1, 2).reshape(b, self.width, h, w))
