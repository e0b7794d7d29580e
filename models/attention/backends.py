"""Attention backends: how the pairs a pattern allows are computed.

A backend is chosen once, at model construction, for one pattern; an impossible pairing
fails there, naming both. Per batch, the model calls `prepare` once and hands the result to
every layer, which calls `attend`.

Shapes: B batch, H query heads, Hkv key/value heads, Lq queries, Lk keys, D head dim.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from models.attention.patterns import AttentionSpecError, Pattern


@dataclass
class BatchGeometry:
    """What every attention layer needs to know about the current batch."""

    q_len: int
    kv_len: int
    q_offset: int = 0  # absolute position of the first query (KV-cache decoding)
    key_padding_mask: Tensor | None = None  # (B, Lk) bool, True for real tokens
    alibi_slopes: Tensor | None = None  # (H,) ALiBi slopes, or None
    device: torch.device | None = None

    @property
    def is_plain(self) -> bool:
        """No padding, no bias, queries aligned with keys: the kernel may use its own mask."""
        return (
            self.key_padding_mask is None
            and self.alibi_slopes is None
            and self.q_offset == 0
            and self.q_len == self.kv_len
        )


def dense_bias(pattern: Pattern, geo: BatchGeometry, dtype: torch.dtype) -> Tensor:
    """(B|1, H|1, Lq, Lk) additive mask: 0 (or the ALiBi bias) where allowed, -inf elsewhere."""
    q_idx = torch.arange(geo.q_offset, geo.q_offset + geo.q_len, device=geo.device)
    k_idx = torch.arange(geo.kv_len, device=geo.device)
    allowed = pattern.token_mask(q_idx, k_idx).unsqueeze(0)  # (1, H|1, Lq, Lk)
    if geo.key_padding_mask is not None:
        allowed = allowed & geo.key_padding_mask[:, None, None, :]
        # A query with no key to attend (a padding query whose keys are all padding) would
        # give NaN through softmax; let it attend everything instead. Its output is
        # padding and never read, but NaN would poison the backward pass.
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=geo.device)
    if geo.alibi_slopes is not None:
        distance = (q_idx[:, None] - k_idx[None, :]).abs().to(dtype)  # (Lq, Lk)
        bias = bias - geo.alibi_slopes.to(dtype)[None, :, None, None] * distance
    return bias.masked_fill(~allowed, float("-inf"))


class Backend(ABC):
    """Computes attention for one pattern."""

    name: ClassVar[str]

    def __init__(self, pattern: Pattern) -> None:
        if not self.supports(pattern):
            raise AttentionSpecError(
                f"attention pattern {pattern.name!r} is not supported by backend {self.name!r}"
                f" (backends that support it: {', '.join(backends_for(pattern))})"
            )
        self.pattern = pattern

    @classmethod
    @abstractmethod
    def supports(cls, pattern: Pattern) -> bool:
        """Whether this backend computes `pattern` exactly."""

    @abstractmethod
    def prepare(self, geo: BatchGeometry, dtype: torch.dtype) -> Any:
        """Per-batch mask state, built once and shared by every layer."""

    @abstractmethod
    def attend(self, q: Tensor, k: Tensor, v: Tensor, prepared: Any, dropout_p: float) -> Tensor:
        """q (B, H, Lq, D), k and v (B, Hkv, Lk, D) -> (B, H, Lq, D)."""

    def probs(self, q: Tensor, k: Tensor, geo: BatchGeometry) -> Tensor:
        """(B, H, Lq, Lk) attention probabilities, materialised: for attention maps."""
        k = _repeat_kv(k, q.shape[1])
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        return torch.softmax(scores + dense_bias(self.pattern, geo, q.dtype), dim=-1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pattern={self.pattern!r})"


def _repeat_kv(x: Tensor, n_heads: int) -> Tensor:
    """(B, Hkv, L, D) -> (B, H, L, D): each key/value head serves H/Hkv query heads."""
    groups = n_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


BACKENDS: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    BACKENDS[cls.name] = cls
    return cls


def backends_for(pattern: Pattern) -> list[str]:
    return [name for name, cls in BACKENDS.items() if cls.supports(pattern)]


def make_backend(name: str, pattern: Pattern) -> Backend:
    """The backend `name` bound to `pattern`; fails now if the pair cannot work."""
    if name not in BACKENDS:
        raise AttentionSpecError(
            f"unknown attention backend {name!r}; known backends: {', '.join(sorted(BACKENDS))}"
        )
    return BACKENDS[name](pattern)


@dataclass
class _SDPAMask:
    bias: Tensor | None  # None: no mask, or the kernel's own causal mask
    is_causal: bool


@register_backend
class SDPABackend(Backend):
    """`torch.nn.functional.scaled_dot_product_attention`: dense patterns; the baseline."""

    name: ClassVar[str] = "sdpa"

    @classmethod
    def supports(cls, pattern: Pattern) -> bool:
        return pattern.is_dense

    def prepare(self, geo: BatchGeometry, dtype: torch.dtype) -> _SDPAMask:
        if geo.is_plain:
            # No mask tensor at all: lets SDPA pick its fused (flash) kernels.
            return _SDPAMask(bias=None, is_causal=self.pattern.causal)
        return _SDPAMask(bias=dense_bias(self.pattern, geo, dtype), is_causal=False)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, prepared: Any, dropout_p: float) -> Tensor:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=prepared.bias,
            dropout_p=dropout_p,
            is_causal=prepared.is_causal,
            enable_gqa=k.shape[1] != q.shape[1],
        )


@register_backend
class ReferenceBackend(Backend):
    """Masked dense softmax written out in PyTorch: every pattern, O(S^2) memory; for tests."""

    name: ClassVar[str] = "reference"

    @classmethod
    def supports(cls, pattern: Pattern) -> bool:
        return True

    def prepare(self, geo: BatchGeometry, dtype: torch.dtype) -> Tensor:
        return dense_bias(self.pattern, geo, dtype)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, prepared: Any, dropout_p: float) -> Tensor:
        k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
        p = torch.softmax(scores + prepared, dim=-1)
        p = F.dropout(p, dropout_p) if dropout_p > 0 else p
        return p @ v
