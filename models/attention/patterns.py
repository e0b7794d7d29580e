"""Attention patterns: which (query, key) pairs may meet.

A pattern is data, not a module. It answers the same question three ways:
- `mask_mod(b, h, q_idx, k_idx)`: the exact token-level rule, FlexAttention's signature,
  vectorised over broadcastable index tensors;
- `block_layout(seq_len, block_size)`: which (query block, key block) tiles hold any allowed
  pair, computed analytically in O(blocks), never by evaluating S x S points;
- `dense_mask(seq_len)`: the materialised boolean mask, for the reference and for tests.

Shapes: H heads (1 when the layout is shared by all heads), S sequence, N blocks.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor


class AttentionSpecError(ValueError):
    """An attention pattern or backend was asked for with names or parameters that cannot work."""


class Pattern(ABC):
    """Base class of every pattern; subclasses are frozen dataclasses of their parameters."""

    name: ClassVar[str]
    causal: bool

    @property
    def is_dense(self) -> bool:
        """True when the pattern is plain full or causal attention (no sparsity)."""
        return False

    @abstractmethod
    def mask_mod(self, b: Tensor | None, h: Tensor | None, q_idx: Tensor, k_idx: Tensor) -> Tensor:
        """True where query `q_idx` may attend key `k_idx` (absolute positions)."""

    @abstractmethod
    def block_layout(self, seq_len: int, block_size: int) -> Tensor:
        """(H|1, N, N) bool: tiles that contain at least one allowed pair."""

    def token_mask(self, q_idx: Tensor, k_idx: Tensor) -> Tensor:
        """(H|1, Lq, Lk) bool for the given query and key positions."""
        mask = self.mask_mod(None, None, q_idx[:, None], k_idx[None, :])
        mask = mask.unsqueeze(0) if mask.dim() == 2 else mask
        return mask.expand(mask.shape[0], q_idx.numel(), k_idx.numel())

    def dense_mask(self, seq_len: int) -> Tensor:
        """(H|1, S, S) bool, True where a query may attend a key."""
        idx = torch.arange(seq_len)
        return self.token_mask(idx, idx)

    def describe(self) -> dict[str, Any]:
        """Name and parameters, for logs and MLflow params."""
        return {"name": self.name, **dataclasses.asdict(self)}  # type: ignore[call-overload]


PATTERNS: dict[str, type[Pattern]] = {}


def register_pattern(cls: type[Pattern]) -> type[Pattern]:
    PATTERNS[cls.name] = cls
    return cls


def make_pattern(name: str, **params: Any) -> Pattern:
    """Build a pattern by name, e.g. `make_pattern("dense", causal=True)`."""
    if name not in PATTERNS:
        raise AttentionSpecError(
            f"unknown attention pattern {name!r}; known patterns: {', '.join(sorted(PATTERNS))}"
        )
    try:
        return PATTERNS[name](**params)
    except TypeError as exc:  # unexpected or missing keyword
        raise AttentionSpecError(f"attention pattern {name!r}: {exc}") from None


@register_pattern
@dataclass(frozen=True)
class Dense(Pattern):
    """Every query meets every key (full), or every key at or before it (causal).

    full (causal=False)      causal (causal=True)
        k 0 1 2 3 4              k 0 1 2 3 4
      q0  x x x x x            q0  x . . . .
      q1  x x x x x            q1  x x . . .
      q2  x x x x x            q2  x x x . .
      q3  x x x x x            q3  x x x x .
      q4  x x x x x            q4  x x x x x

    Vaswani et al. 2017, "Attention Is All You Need".
    """

    name: ClassVar[str] = "dense"
    causal: bool = False

    @property
    def is_dense(self) -> bool:
        return True

    def mask_mod(self, b: Tensor | None, h: Tensor | None, q_idx: Tensor, k_idx: Tensor) -> Tensor:
        if self.causal:
            return k_idx <= q_idx
        return torch.ones_like(q_idx == k_idx)

    def block_layout(self, seq_len: int, block_size: int) -> Tensor:
        n = math.ceil(seq_len / block_size)
        full = torch.ones(1, n, n, dtype=torch.bool)
        # Block i holds queries i*bs.., block j keys j*bs..: causal tiles are those with j <= i.
        return full.tril() if self.causal else full
