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
    Backend,
    BatchGeometry,
    Dense,
    Pattern,
    make_backend,
    make_pattern,
)
from models.attention.patterns import head_slice
from models.config import AttentionConfig, ModelConfig
from models.layers import AttentionBatch, Block, KVCache, make_norm
from models.loss import LMHead
from models.parallel import SequenceParallel
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
        self.head_dim, self.n_heads = cfg.head_dim, cfg.n_heads
        slopes = alibi_slopes(cfg.n_heads) if cfg.positional == "alibi" else None
        self.register_buffer("alibi", slopes, persistent=False)
        self.activation_checkpointing = False  # set_activation_checkpointing() turns it on
        # sequence parallelism (models/parallel.py): the group, and the backend of this
        # rank's heads, whose per-batch mask covers the whole sequence
        self.sp: SequenceParallel | None = None
        self.sp_backend: Backend | None = None

    def set_sequence_parallel(self, sp: SequenceParallel | None) -> None:
        self.sp = sp
        self.sp_backend = None
        if sp is not None:
            pattern = head_slice(self.pattern, sp.heads(self.n_heads))
            self.sp_backend = make_backend(self.backend.name, pattern, self.backend.block_size)

    def attention_batch(
        self,
        q_len: int,
        q_offset: int,
        key_padding_mask: Tensor | None,
        like: Tensor,
        document_ids: Tensor | None = None,
    ) -> AttentionBatch:
        """The per-batch mask and rotary angles for self-attention over q_offset + q_len keys.

        Sequence parallel, q_len is the whole sequence (its padding mask and document ids
        too), `like` this rank's slice: the mask is the whole sequence's for this rank's
        heads, the rotary angles those of the slice's positions."""
        sp, backend, slopes = self.sp, self.backend, self.alibi
        first, last = q_offset, q_offset + q_len  # the positions this rank embeds
        if sp is not None:
            assert self.sp_backend is not None
            backend, (first, last) = self.sp_backend, sp.span(q_len)
            slopes = slopes[sp.heads(self.n_heads)] if slopes is not None else None
        geo = BatchGeometry(
            q_len=q_len,
            kv_len=q_offset + q_len,
            q_offset=q_offset,
            key_padding_mask=key_padding_mask,
            alibi_slopes=slopes,
            device=like.device,
            document_ids=document_ids,
        )
        rope = None
        if self.rope_theta is not None:
            positions = torch.arange(first, last, device=like.device)
            rope = rope_cos_sin(positions, self.head_dim, self.rope_theta)
        return AttentionBatch(geo, backend.prepare(geo, like.dtype), rope, sp)

    def local(self, x: Tensor | None) -> Tensor | None:
        """This rank's slice of a whole-sequence (B, S, ...) tensor; x itself without
        sequence parallelism."""
        return x if self.sp is None or x is None else self.sp.local(x)

    def slice_start(self, length: int) -> int:
        """The position of this rank's first token in a sequence of `length` (0 without
        sequence parallelism): where it embeds its slice."""
        return 0 if self.sp is None else self.sp.span(length)[0]

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
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.tokens.weight
        init_weights(self, cfg, cfg.n_layers)

    def forward(
        self,
        input_ids: Tensor,  # (B, S)
        key_padding_mask: Tensor | None = None,  # (B, S) bool, True for real tokens
        cache: KVCache | None = None,
        document_ids: Tensor | None = None,  # (B, S) packed documents, ascending ids
        labels: Tensor | None = None,  # (B, S) next-token targets, -100 where none
    ) -> Tensor:
        """The logits (B, S, V); with labels, the summed cross-entropy (a 0-d fp32 tensor).
        Sequence parallel: whole sequences in, this rank's slice's logits or loss out."""
        offset = cache.length if cache is not None else 0
        if cache is not None and (key_padding_mask is not None or document_ids is not None):
            raise ValueError("KV-cache decoding takes unpadded, single-document prompts")
        length = input_ids.shape[1]
        x = self.embed(self.decoder.local(input_ids), offset + self.decoder.slice_start(length))
        batch = self.decoder.attention_batch(length, offset, key_padding_mask, x, document_ids)
        h = self.decoder(x, batch, cache=cache)
        return self.lm_head(h, self.decoder.local(labels))  # (B, S, V) or the loss

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
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size, bias=cfg.bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.tokens.weight
        init_weights(self, cfg, cfg.n_layers)

    def encode(
        self,
        input_ids: Tensor,
        key_padding_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        """(B, S) token ids -> (B, S, C) contextual states (sequence parallel: of this
        rank's slice)."""
        length = input_ids.shape[1]
        x = self.embed(self.encoder.local(input_ids), self.encoder.slice_start(length))
        batch = self.encoder.attention_batch(
            input_ids.shape[1], 0, key_padding_mask, x, document_ids
        )
        return self.encoder(x, batch)

    def forward(
        self,
        input_ids: Tensor,
        key_padding_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
        labels: Tensor | None = None,  # (B, S) the masked tokens, -100 elsewhere
    ) -> Tensor:
        """The logits (B, S, V); with labels, the summed cross-entropy (0-d fp32)."""
        h = self.encode(input_ids, key_padding_mask, document_ids)
        h = self.head_norm(nn.functional.gelu(self.head_transform(h)))
        return self.lm_head(h, self.encoder.local(labels))  # (B, S, V) or the loss


class EncoderDecoderLM(nn.Module):
    """Encoder-decoder sequence-to-sequence LM with cross-attention (Vaswani et al. 2017)."""

    def __init__(self, cfg: ModelConfig, attention: AttentionConfig | None = None) -> None:
        super().__init__()
        attention = attention or AttentionConfig()
        self.cfg = cfg
        self.embed = Embedder(cfg)  # shared by source and target, as in the paper
        self.encoder = TransformerStack(cfg, attention, cfg.encoder_layers, causal=False)
        self.decoder = TransformerStack(cfg, attention, cfg.decoder_layers, causal=True, cross=True)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size, bias=False)
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
        labels: Tensor | None = None,
    ) -> Tensor:
        offset = cache.length if cache is not None else 0
        x = self.embed(tgt_ids, offset)
        batch = self.decoder.attention_batch(tgt_ids.shape[1], offset, tgt_padding_mask, x)
        cross = self.decoder.cross_batch(tgt_ids.shape[1], memory, src_padding_mask)
        h = self.decoder(x, batch, cross, memory, cache)
        return self.lm_head(h, labels)  # (B, S, V), or the summed loss with labels

    def forward(
        self,
        src_ids: Tensor,
        tgt_ids: Tensor,
        src_padding_mask: Tensor | None = None,
        tgt_padding_mask: Tensor | None = None,
        labels: Tensor | None = None,  # (B, S) next target tokens, -100 where none
    ) -> Tensor:
        """The logits (B, S, V); with labels, the summed cross-entropy (0-d fp32)."""
        memory = self.encode(src_ids, src_padding_mask)
        return self.decode(tgt_ids, memory, src_padding_mask, tgt_padding_mask, labels=labels)

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


def set_loss_chunking(model: nn.Module, tokens: int | None) -> None:
    """Compute the LM head and its loss `tokens` at a time (models/loss.py): the logits of the
    whole batch are never built. None: all at once."""
    for head in model.modules():
        if isinstance(head, LMHead):
            head.chunk_tokens = tokens


def set_mlp_chunking(model: nn.Module, tokens: int | None) -> None:
    """Tiled MLP: each block's feed-forward `tokens` at a time, recomputed in backward
    (models/layers.py Block). None: the whole sequence at once."""
    for block in model.modules():
        if isinstance(block, Block):
            block.mlp_chunk_tokens = tokens


def build_model(cfg: ModelConfig, attention: AttentionConfig | None = None) -> nn.Module:
    """The model of `cfg.family`. Build under `torch.device("meta")` to size it for free."""
    return MODEL_CLASSES[cfg.family](cfg, attention)
