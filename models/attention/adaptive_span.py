"""Adaptive attention span (Sukhbaatar et al. 2019, "Adaptive Attention Span in Transformers").

Each head h learns a span z_h. Attention to a key at distance x = q - k is weighted by the
soft mask m(x) = clamp((R + z_h - x) / R, 0, 1), with R the ramp:

    a_qk = m(q - k) exp(s_qk) / sum_k' m(q - k') exp(s_qk')

and a penalty proportional to the spans is added to the loss, so heads keep only the
context they use. Compute follows the learned span: only keys within the largest current
span plus the ramp are ever scored, block by block of queries, so a model whose spans
shrink gets cheaper as it trains.

Shapes: B batch, H heads, L query block, W keys in the window, D head dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models.attention.backends import _repeat_kv


class AdaptiveSpan(nn.Module):
    """Learnable per-head spans, stored as fractions of `max_span` in [0, 1]."""

    def __init__(self, n_heads: int, max_span: int, ramp: int = 32, init: float = 0.5) -> None:
        super().__init__()
        if max_span < 1 or ramp < 1 or not 0.0 <= init <= 1.0:
            raise ValueError("adaptive span needs max_span >= 1, ramp >= 1 and init in [0, 1]")
        self.max_span, self.ramp = max_span, ramp
        self.fraction = nn.Parameter(torch.full((n_heads,), float(init)))

    def spans(self) -> Tensor:
        """(H,) current spans in tokens."""
        return self.fraction.clamp(0.0, 1.0) * self.max_span

    def window(self, heads: slice = slice(None)) -> int:
        """Keys back that can get any weight: the largest span (of `heads`) plus the ramp."""
        largest = float(self.spans()[heads].detach().max())  # a host sync per layer and batch
        return min(self.max_span + self.ramp, math.ceil(largest + self.ramp))

    def soft_mask(self, distance: Tensor, heads: slice = slice(None)) -> Tensor:
        """(H, ...) m(x) for distances x = q - k (causal: x < 0 gets 0), for `heads`."""
        z = self.spans()[heads].view(-1, *([1] * distance.dim()))
        m = ((self.ramp + z - distance) / self.ramp).clamp(0.0, 1.0)
        return m * (distance >= 0)

    def penalty(self) -> Tensor:
        """Mean span in tokens: the loss term the config's coefficient multiplies."""
        return self.spans().mean()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep spans in [0, max_span] after an optimizer step, as the paper does."""
        self.fraction.clamp_(0.0, 1.0)

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        q_offset: int = 0,
        block: int = 64,
        heads: slice = slice(None),
    ) -> Tensor:
        """q (B, H, Lq, D) at positions q_offset.., k and v (B, Hkv, Lk, D) -> (B, H, Lq, D).
        `heads`: which of the module's heads q holds (a sequence-parallel rank's share)."""
        k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
        window, scale = self.window(heads), 1.0 / math.sqrt(q.shape[-1])
        outs = []
        for start in range(0, q.shape[2], block):
            stop = min(q.shape[2], start + block)
            first = max(0, q_offset + start - window)  # keys beyond the window weigh 0
            last = q_offset + stop  # causal: keys up to the block's last query
            p = self._weights(
                q[:, :, start:stop], k[:, :, first:last], q_offset + start, first, scale, heads
            )
            outs.append(p @ v[:, :, first:last])
        return torch.cat(outs, dim=2)

    def probs(self, q: Tensor, k: Tensor, q_offset: int = 0) -> Tensor:
        """(B, H, Lq, Lk) the attention weights, materialised: for attention maps."""
        k = _repeat_kv(k, q.shape[1])
        return self._weights(q, k, q_offset, 0, 1.0 / math.sqrt(q.shape[-1]))

    def _weights(
        self,
        q: Tensor,
        k: Tensor,
        q_pos: int,
        k_pos: int,
        scale: float,
        heads: slice = slice(None),
    ) -> Tensor:
        qi = torch.arange(q_pos, q_pos + q.shape[2], device=q.device)
        ki = torch.arange(k_pos, k_pos + k.shape[2], device=q.device)
        m = self.soft_mask((qi[:, None] - ki[None, :]).float(), heads)  # (H, L, W)
        s = (q @ k.transpose(-1, -2)).float() * scale  # (B, H, L, W)
        s = s.masked_fill(m == 0, float("-inf"))
        e = torch.exp(s - s.amax(dim=-1, keepdim=True)) * m  # m(x) exp(s), stable
        return (e / e.sum(dim=-1, keepdim=True)).to(q.dtype)


def span_modules(model: nn.Module) -> list[AdaptiveSpan]:
    return [m for m in model.modules() if isinstance(m, AdaptiveSpan)]


def span_penalty(model: nn.Module) -> Tensor | float:
    """Sum over layers of the mean span (tokens); multiply by the config's coefficient."""
    spans = span_modules(model)
    return sum((m.penalty() for m in spans), torch.zeros(())) if spans else 0.0


def current_spans(model: nn.Module) -> dict[int, list[float]]:
    """{layer: per-head spans in tokens}, for logging."""
    return {i: m.spans().tolist() for i, m in enumerate(span_modules(model))}


def clamp_spans(model: nn.Module) -> None:
    for m in span_modules(model):
        m.clamp_()
