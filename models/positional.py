"""Positional encodings: sinusoidal and learned (added to embeddings), RoPE (rotates q and k),
ALiBi (a per-head linear bias on attention scores), and none.

Shapes: B batch, H heads, S sequence, D head dim, C model width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_table(n_positions: int, dim: int) -> Tensor:
    """(S, C) table of Vaswani et al. 2017, section 3.5: sin on even, cos on odd channels."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq[: dim // 2])
    return table


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal absolute positions; no parameters."""

    def __init__(self, max_len: int, dim: int) -> None:
        super().__init__()
        # Not persistent: derived from the config, so checkpoints need not carry it.
        self.register_buffer("table", sinusoidal_table(max_len, dim), persistent=False)

    def forward(self, positions: Tensor) -> Tensor:
        return self.table[positions]  # (S, C)


class LearnedPositions(nn.Module):
    """Learned absolute position embeddings (GPT-2, BERT)."""

    def __init__(self, max_len: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(max_len, dim)

    def forward(self, positions: Tensor) -> Tensor:
        return self.embedding(positions)  # (S, C)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """Rotary angles (Su et al. 2021) for `positions`: cos and sin, each (S, D)."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim
    )
    angles = positions.float()[:, None] * inv_freq[None, :]  # (S, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (S, D), rotate-half layout
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, S, D) by per-position angles; pairs channel i with i + D/2."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos.to(x.dtype) + rotated * sin.to(x.dtype)).type_as(x)


def alibi_slopes(n_heads: int) -> Tensor:
    """(H,) head slopes of Press et al. 2022: a geometric sequence starting at 2^(-8/n).

    For a head count that is not a power of two, the paper's recipe: the slopes of the
    nearest lower power of two, then every other slope of the next power of two.
    """

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(power_of_two(n_heads))
    lower = 2 ** math.floor(math.log2(n_heads))
    extra = power_of_two(2 * lower)[0::2][: n_heads - lower]
    return torch.tensor(power_of_two(lower) + extra)
