"""The transformer family: decoder-only causal LM, encoder with a masked-LM head, and
encoder-decoder (seq2seq LM) with cross-attention.

Each stack turns the attention config into a pattern and a backend once, at construction,
and builds the per-batch mask once at the top of its forward pass for all of its layers.

Shapes: B batch, S (or L) sequence, C model width, V vocabulary.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.attention import (
    PATTERNS,
    AttentionSpecError,
    BatchGeometry,
    Dense,
    Pattern,
    make_backend,
    make_pattern,
)
from models.config import AttentionConfig, ModelConfig
from models.layers import AttentionBatch, Block, KVCache, make_norm
from models.positional import LearnedPositions, SinusoidalPositions, alibi_slopes, rope_cos_sin


class Embedder(nn.Module):
    """Token embedding plus absolute positions (learned or sinusoidal), then dropout."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.max_len = cfg.max_seq_len
        self.positions: nn.Module | None = None
        if cfg.positional == "learned":
            self.positions = LearnedPositions(cfg.max_seq_len, cfg.d_model)
        elif cfg.positional == "sinusoidal":
            self.positions = SinusoidalPositions(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, ids: Tensor, offset: int = 0) -> Tensor:
        x = self.tokens(ids)  # (B, S, C)
        if self.positions is not None:
            if offset + ids.shape[1] > self.max_len:
                raise ValueError(
                    f"sequence of {offset + ids.shape[1]} tokens exceeds max_seq_len={self.max_len}"
                )
            x = x + self.positions(torch.arange(offset, offset + ids.shape[1], device=ids.device))
        return self.drop(x)


class TransformerStack(nn.Module):
    """n pre-norm blocks and a final norm, with one pattern and one backend for all layers."""

    def __init__(
        self,
        cfg: ModelConfig,
        attention: AttentionConfig,
        n_layers: int,
        causal: bool,
        cross: bool = False,
    ) -> None:
        super().__init__()
        self.pattern = stack_pattern(attention, causal, cfg.n_heads)
        self.backend = make_backend(attention.backend, self.pattern, attention.block_size)
        if cfg.positional == "alibi" and not self.backend.supports_alibi:
            raise AttentionSpecError(
                f"positional 'alibi' is not supported by backend {attention.backend!r}"
            )
        if cfg.dropout > 0 and not self.backend.supports_dropout:
            raise AttentionSpecError(
                f"backend {attention.backend!r} applies no attention dropout: set dropout 0"
            )
        span = attention.adaptive_span if causal and not cross else None
        if attention.adaptive_span is not None and (
            cfg.family != "decoder" or not self.pattern.is_dense
        ):
            raise AttentionSpecError(
                "adaptive_span is for a decoder's causal self-attention with pattern 'dense'"
            )
        cross_backend = None
        if cross:  # cross-attention sees the whole source: dense, never causal
            full = Dense(causal=False)
            name = attention.backend if attention.backend in ("sdpa", "reference") else "sdpa"
            cross_backend = make_backend(name, full)
        self.blocks = nn.ModuleList(
            Block(cfg, self.backend, cross_backend, span) for _ in range(n_layers)
        )
        self.norm = make_norm(cfg)
        self.cross_backend = cross_backend
        self.rope_theta = cfg.rope_theta if cfg.positional == "rope" else None
        self.head_dim = cfg.head_dim
        slopes = alibi_slopes(cfg.n_heads) if cfg.positional == "alibi" else None
        self.register_buffer("alibi", slopes, persistent=False)
        self.activation_checkpointing = False  # set_activation_checkpointing() turns it on

    def attention_batch(
        self,
        q_len: int,
        q_offset: int,
        key_padding_mask: Tensor | None,
        like: Tensor,
        document_ids: Tensor | None = None,
    ) -> AttentionBatch:
        """The per-batch mask and rotary angles for self-attention over q_offset + q_len keys."""
        geo = BatchGeometry(
            q_len=q_len,
            kv_len=q_offset + q_len,
            q_offset=q_offset,
            key_padding_mask=key_padding_mask,
            alibi_slopes=self.alibi,
            device=like.device,
            document_ids=document_ids,
        )
        rope = None
        if self.rope_theta is not None:
            positions = torch.arange(q_offset, q_offset + q_len, device=like.device)
            rope = rope_cos_sin(positions, self.head_dim, self.rope_theta)
        return AttentionBatch(geo, self.backend.prepare(geo, like.dtype), rope)

    def cross_batch(
        self, q_len: int, memory: Tensor, memory_padding_mask: Tensor | None
    ) -> AttentionBatch:
        """The per-batch mask for cross-attention from q_len queries to the whole source."""
        assert self.cross_backend is not None
        geo = BatchGeometry(
            q_len=q_len,
            kv_len=memory.shape[1],
            key_padding_mask=memory_padding_mask,
            device=memory.device,
            self_attention=False,
        )
        return AttentionBatch(geo, self.cross_backend.prepare(geo, memory.dtype))

    def forward(
        self,
        x: Tensor,  # (B, S, C)
        batch: AttentionBatch,
        cross_batch: AttentionBatch | None = None,
        memory: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training and cache is None:
                # keep only each block's input; recompute its activations in backward
                x = checkpoint(block, x, batch, cross_batch, memory, None, use_reentrant=False)
                continue
            layer_cache = cache.layer(i) if cache is not None else None
            x = block(x, batch, cross_batch, memory, layer_cache)
        return self.norm(x)


def stack_pattern(attention: AttentionConfig, causal: bool, n_heads: int) -> Pattern:
    """The attention config's pattern for a stack; per-head patterns get the head count."""
    params = dict(attention.params)
    cls = PATTERNS.get(attention.pattern)
    if cls is not None and "heads" in getattr(cls, "__dataclass_fields__", {}):
        params.setdefault("heads", n_heads)
    pattern = make_pattern(attention.pattern, causal=causal, **params)
    if pattern.n_heads not in (1, n_heads):
        raise AttentionSpecError(
            f"pattern {attention.pattern!r} has {pattern.n_heads} head layouts for {n_heads} heads"
        )
    return pattern


def init_weights(model: nn.Module, cfg: ModelConfig, n_residual_layers: int) -> None:
    """GPT-2 initialisation: N(0, init_std) weights, zero biases, and projections into the
    residual stream scaled by 1/sqrt(2 * layers) so the stream's variance does not grow
    with depth (Radford et al. 2019, section 2.3)."""
    residual_std = cfg.init_std / math.sqrt(2 * n_residual_layers)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            std = residual_std if getattr(module, "is_residual_projection", False) else cfg.init_std
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std)


class DecoderLM(nn.Module):
    """Decoder-only causal language model (GPT)."""

    def __init__(self, cfg: ModelConfig, attention: AttentionConfig | None = None) -> None:
        super().__init__()
        attention = attention or AttentionConfig()
        self.cfg = cfg
        self.embed = Embedder(cfg)
        self.decoder = TransformerStack(cfg, attention, cfg.n_layers, causal=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.tokens.weight
        init_weights(self, cfg, cfg.n_layers)

    def forward(
        self,
        input_ids: Tensor,  # (B, S)
        key_padding_mask: Tensor | None = None,  # (B, S) bool, True for real tokens
        cache: KVCache | None = None,
        document_ids: Tensor | None = None,  # (B, S) packed documents, ascending ids
    ) -> Tensor:
        offset = cache.length if cache is not None else 0
        if cache is not None and (key_padding_mask is not None or document_ids is not None):
            raise ValueError("KV-cache decoding takes unpadded, single-document prompts")
        x = self.embed(input_ids, offset)
        batch = self.decoder.attention_batch(
            input_ids.shape[1], offset, key_padding_mask, x, document_ids
        )
        return self.lm_head(self.decoder(x, batch, cache=cache))  # (B, S, V)

    def new_cache(self) -> KVCache:
        return KVCache(len(self.decoder.blocks))


class EncoderMLM(nn.Module):
    """Bidirectional encoder with a BERT-style masked-LM head."""

    def __init__(self, cfg: ModelConfig, attention: AttentionConfig | None = None) -> None:
        super().__init__()
        attention = attention or AttentionConfig()
        self.cfg = cfg
        self.embed = Embedder(cfg)
        self.encoder = TransformerStack(cfg, attention, cfg.n_layers, causal=False)
        self.head_transform = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.head_norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.tokens.weight
        init_weights(self, cfg, cfg.n_layers)

    def encode(
        self,
        input_ids: Tensor,
        key_padding_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        """(B, S) token ids -> (B, S, C) contextual states."""
        x = self.embed(input_ids)
        batch = self.encoder.attention_batch(
            input_ids.shape[1], 0, key_padding_mask, x, document_ids
        )
        return self.encoder(x, batch)

    def forward(
        self,
        input_ids: Tensor,
        key_padding_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        h = self.encode(input_ids, key_padding_mask, document_ids)
        h = self.head_norm(nn.functional.gelu(self.head_transform(h)))
        return self.lm_head(h)  # (B, S, V)


class EncoderDecoderLM(nn.Module):
    """Encoder-decoder sequence-to-sequence LM with cross-attention (Vaswani et al. 2017)."""

    def __init__(self, cfg: ModelConfig, attention: AttentionConfig | None = None) -> None:
        super().__init__()
        attention = attention or AttentionConfig()
        self.cfg = cfg
        self.embed = Embedder(cfg)  # shared by source and target, as in the paper
        self.encoder = TransformerStack(cfg, attention, cfg.encoder_layers, causal=False)
        self.decoder = TransformerStack(cfg, attention, cfg.decoder_layers, causal=True, cross=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.tokens.weight
        init_weights(self, cfg, max(cfg.encoder_layers, cfg.decoder_layers))

    def encode(self, src_ids: Tensor, src_padding_mask: Tensor | None = None) -> Tensor:
        x = self.embed(src_ids)
        batch = self.encoder.attention_batch(src_ids.shape[1], 0, src_padding_mask, x)
        return self.encoder(x, batch)  # (B, Ssrc, C)

    def decode(
        self,
        tgt_ids: Tensor,  # (B, S)
        memory: Tensor,  # (B, Ssrc, C)
        src_padding_mask: Tensor | None = None,
        tgt_padding_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        offset = cache.length if cache is not None else 0
        x = self.embed(tgt_ids, offset)
        batch = self.decoder.attention_batch(tgt_ids.shape[1], offset, tgt_padding_mask, x)
        cross = self.decoder.cross_batch(tgt_ids.shape[1], memory, src_padding_mask)
        return self.lm_head(self.decoder(x, batch, cross, memory, cache))  # (B, S, V)

    def forward(
        self,
        src_ids: Tensor,
        tgt_ids: Tensor,
        src_padding_mask: Tensor | None = None,
        tgt_padding_mask: Tensor | None = None,
    ) -> Tensor:
        memory = self.encode(src_ids, src_padding_mask)
        return self.decode(tgt_ids, memory, src_padding_mask, tgt_padding_mask)

    def new_cache(self) -> KVCache:
        return KVCache(len(self.decoder.blocks), cross=True)


MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "decoder": DecoderLM,
    "encoder": EncoderMLM,
    "encoder_decoder": EncoderDecoderLM,
}


def set_activation_checkpointing(model: nn.Module, enabled: bool = True) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them:
    memory for one block's input per layer, at the cost of a second forward."""
    for stack in model.modules():
        if isinstance(stack, TransformerStack):
            stack.activation_checkpointing = enabled


def build_model(cfg: ModelConfig, attention: AttentionConfig | None = None) -> nn.Module:
    """The model of `cfg.family`. Build under `torch.device("meta")` to size it for free."""
    return MODEL_CLASSES[cfg.family](cfg, attention)
