"""Transformer building blocks: multi-head attention (self and cross, MHA/GQA/MQA), MLPs,
pre-norm residual blocks, and the key/value cache.

Shapes: B batch, L this call's length, T cached length, H query heads, Hkv key/value heads,
D head dim, C model width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.attention import Backend, BatchGeometry
from models.attention.adaptive_span import AdaptiveSpan
from models.config import AdaptiveSpanConfig, ModelConfig
from models.parallel import SequenceParallel
from models.positional import apply_rope


@dataclass
class AttentionBatch:
    """Built once per batch by a stack and handed, unchanged, to every layer."""

    geo: BatchGeometry
    prepared: Any  # the backend's mask state for this batch
    rope: tuple[Tensor, Tensor] | None = None  # cos, sin (L, D) at the query positions
    # sequence parallel: x holds this rank's slice; geo and prepared are the whole
    # sequence's, for this rank's heads (models/parallel.py)
    sp: SequenceParallel | None = None


@dataclass
class LayerCache:
    """Keys and values one attention layer has seen so far (B, Hkv, T, D)."""

    k: Tensor | None = None
    v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class KVCache:
    """Per-layer caches for incremental decoding; cross-attention keys are computed once."""

    def __init__(self, n_layers: int, cross: bool = False) -> None:
        self.self_attn = [LayerCache() for _ in range(n_layers)]
        self.cross_attn = [LayerCache() for _ in range(n_layers)] if cross else None

    @property
    def length(self) -> int:
        """Number of positions already in the cache."""
        k = self.self_attn[0].k
        return 0 if k is None else k.shape[2]

    def layer(self, i: int) -> tuple[LayerCache, LayerCache | None]:
        return self.self_attn[i], (self.cross_attn[i] if self.cross_attn is not None else None)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def _residual(linear: nn.Linear) -> nn.Linear:
    """Mark a projection that writes into the residual stream (GPT-2 scales its init)."""
    linear.is_residual_projection = True  # type: ignore[attr-defined]
    return linear


class Attention(nn.Module):
    """Multi-head scaled dot-product attention with separate Q, K, V projections.

    n_kv_heads < n_heads gives grouped-query attention (1: multi-query). With `cross=True`
    the keys and values come from another sequence (the encoder's output).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        backend: Backend,
        cross: bool = False,
        span: AdaptiveSpanConfig | None = None,
    ) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        kv_dim = self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.bias)
        self.out_proj = _residual(nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias))
        self.backend, self.cross, self.dropout = backend, cross, cfg.dropout
        self.span = AdaptiveSpan(cfg.n_heads, span.max_span, span.ramp, span.init) if span else None
        self.capture = False  # set by models.maps.capture_attention
        self.captured: Tensor | None = None

    def _heads(self, x: Tensor, n: int) -> Tensor:
        B, L, _ = x.shape
        return x.view(B, L, n, self.head_dim).transpose(1, 2)  # (B, n, L, D)

    def forward(
        self,
        x: Tensor,  # (B, L, C)
        batch: AttentionBatch,
        memory: Tensor | None = None,  # (B, Lsrc, C), cross-attention only
        cache: LayerCache | None = None,
    ) -> Tensor:
        q = self._heads(self.q_proj(x), self.n_heads)  # (B, H, L, D)
        if self.cross and cache is not None and cache.k is not None:
            k, v = cache.k, cache.v  # the source does not change while decoding
        else:
            source = memory if self.cross else x
            k = self._heads(self.k_proj(source), self.n_kv_heads)  # (B, Hkv, L|Lsrc, D)
            v = self._heads(self.v_proj(source), self.n_kv_heads)
            if batch.rope is not None:
                q, k = apply_rope(q, *batch.rope), apply_rope(k, *batch.rope)
            if cache is not None:
                k, v = cache.append(k, v)  # (B, Hkv, T + L, D)
        sp, heads = batch.sp, slice(None)
        if sp is not None:  # trade this rank's slice of every head for all of its own heads
            if cache is not None or self.capture:
                raise ValueError(
                    "sequence parallelism trains and evaluates: decoding and attention maps "
                    "run without it"
                )
            q, k, v = sp.to_heads(q), sp.to_heads_kv(k), sp.to_heads_kv(v)  # (B, H/P, S, D)
            heads = sp.heads(self.n_heads)
        if self.span is not None:  # learned spans decide which keys are scored
            block = self.backend.block_size
            out = self.span.attend(q, k, v, batch.geo.q_offset, block, heads)
        else:
            dropout_p = self.dropout if self.training else 0.0
            out = self.backend.attend(q, k, v, batch.prepared, dropout_p)  # (B, H, L, D)
        if sp is not None:
            out = sp.to_sequence(out)  # (B, H, S/P, D)
        if self.capture:
            probs = (
                self.span.probs(q, k, batch.geo.q_offset)
                if self.span is not None
                else self.backend.probs(q, k, batch.geo)
            )
            self.captured = probs.detach()
        B, _, L, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    """Position-wise feed-forward: GELU (GPT-2) or SwiGLU (Shazeer 2020, LLaMA)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        self.up = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.bias)
        self.gate = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.bias) if self.gated else None
        self.down = _residual(nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.bias))

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is not None:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-norm residual block: self-attention, optional cross-attention, MLP."""

    def __init__(
        self,
        cfg: ModelConfig,
        backend: Backend,
        cross_backend: Backend | None,
        span: AdaptiveSpanConfig | None = None,
    ) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, backend, span=span)
        self.cross_norm = make_norm(cfg) if cross_backend else None
        self.cross_attn = Attention(cfg, cross_backend, cross=True) if cross_backend else None
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.mlp_chunk_tokens: int | None = None  # set by models.transformer.set_mlp_chunking

    def forward(
        self,
        x: Tensor,  # (B, L, C)
        batch: AttentionBatch,
        cross_batch: AttentionBatch | None = None,
        memory: Tensor | None = None,
        cache: tuple[LayerCache, LayerCache | None] | None = None,
    ) -> Tensor:
        self_cache, cross_cache = cache if cache is not None else (None, None)
        x = x + self.drop(self.attn(self.attn_norm(x), batch, cache=self_cache))
        if self.cross_attn is not None and self.cross_norm is not None:
            if cross_batch is None or memory is None:
                raise ValueError("a block with cross-attention needs the encoder's output")
            h = self.cross_attn(self.cross_norm(x), cross_batch, memory=memory, cache=cross_cache)
            x = x + self.drop(h)
        return x + self.drop(self._feed_forward(x))

    def _feed_forward(self, x: Tensor) -> Tensor:
        """The MLP on its norm, position by position: in chunks of mlp_chunk_tokens along the
        sequence when set (tiled MLP), each recomputed in backward, so only the chunk's
        (L, ffn_dim) activations live at once."""
        chunk = self.mlp_chunk_tokens
        if chunk is None or chunk >= x.shape[1] or not torch.is_grad_enabled():
            return self._norm_mlp(x)
        parts = [
            checkpoint(self._norm_mlp, x[:, i : i + chunk], use_reentrant=False)
            for i in range(0, x.shape[1], chunk)
        ]
        return torch.cat(parts, dim=1)

    def _norm_mlp(self, x: Tensor) -> Tensor:
        return self.mlp(self.mlp_norm(x))
