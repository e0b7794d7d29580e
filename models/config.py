"""Typed configuration of the model family, the size presets, and exact sizing formulas.

This module imports no torch: the job-spec validator, `attnpipe models` and the memory
planner use it to reason about a model without building one.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Family = Literal["decoder", "encoder", "encoder_decoder"]
Positional = Literal["sinusoidal", "learned", "rope", "alibi", "none"]


class FieldError(ValueError):
    """A cross-field check failed; `field` names the offending field of the node."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class _Node(BaseModel):
    """A config node: unknown keys are rejected, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Node):
    """Architecture of one transformer. Defaults describe a GPT-2-style decoder."""

    family: Family = Field(
        "decoder",
        description="Model type: decoder (causal LM), encoder (masked LM) or encoder_decoder "
        "(seq2seq LM)",
    )
    vocab_size: int = Field(
        50257,
        ge=2,
        description="Vocabulary of the embedding and output layers; default size of the tokenizer",
    )
    d_model: int = Field(768, ge=1, description="Hidden width of the residual stream")
    n_layers: int = Field(12, ge=1, description="Decoder layers (encoder layers for an encoder)")
    n_encoder_layers: int | None = Field(
        None, ge=1, description="Encoder layers of an encoder_decoder; default: n_layers"
    )
    n_heads: int = Field(12, ge=1, description="Query attention heads; must divide d_model")
    n_kv_heads: int | None = Field(
        None,
        ge=1,
        description="Key/value heads: n_heads (MHA, the default), 1 (MQA) or a divisor (GQA)",
    )
    d_ff: int | None = Field(
        None,
        ge=1,
        description="MLP hidden width; default `4*d_model` (gelu) "
        "or `8/3*d_model` rounded up to ffn_multiple_of (swiglu)",
    )
    ffn_multiple_of: int = Field(
        256, ge=1, description="The swiglu default d_ff is rounded up to a multiple of this"
    )
    max_seq_len: int = Field(
        1024,
        ge=1,
        description="Longest sequence in tokens; sizes and limits learned/sinusoidal positions",
    )
    positional: Positional = Field(
        "learned", description="Position encoding: sinusoidal, learned, rope, alibi or none"
    )
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency (positional: rope)")
    norm: Literal["layernorm", "rmsnorm"] = Field(
        "layernorm", description="Normalisation layer (pre-norm blocks and final norm)"
    )
    norm_eps: float = Field(1e-5, gt=0, description="Epsilon of every norm layer")
    mlp: Literal["gelu", "swiglu"] = Field(
        "gelu", description="MLP: gelu (two matrices) or swiglu (gated, three matrices)"
    )
    bias: bool = Field(
        True,
        description="Biases in linear and LayerNorm layers; among LM heads, only the encoder's",
    )
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout probability on embeddings, attention weights and residual branches",
    )
    tie_embeddings: bool = Field(
        True, description="Share the token embedding matrix with the output projection"
    )
    init_std: float = Field(
        0.02,
        gt=0,
        description="Std of the normal weight init; residual projections get `/sqrt(2*layers)`",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise FieldError(
                "n_heads", f"n_heads={self.n_heads} does not divide d_model={self.d_model}"
            )
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise FieldError(
                "n_kv_heads", f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}"
            )
        if self.positional == "rope" and self.head_dim % 2:
            raise FieldError("n_heads", f"rope needs an even head dimension, got {self.head_dim}")
        if self.n_encoder_layers is not None and self.family != "encoder_decoder":
            raise FieldError("n_encoder_layers", "only an encoder_decoder has n_encoder_layers")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "gelu":
            return 4 * self.d_model
        # SwiGLU keeps the parameter count of a 4*d GELU MLP with three matrices (LLaMA).
        hidden = int(2 * 4 * self.d_model / 3)
        return self.ffn_multiple_of * math.ceil(hidden / self.ffn_multiple_of)

    @property
    def encoder_layers(self) -> int:
        if self.family == "encoder":
            return self.n_layers
        if self.family == "encoder_decoder":
            return self.n_encoder_layers or self.n_layers
        return 0

    @property
    def decoder_layers(self) -> int:
        return 0 if self.family == "encoder" else self.n_layers


class AdaptiveSpanConfig(_Node):
    """Adaptive attention span (Sukhbaatar et al. 2019) for a decoder's self-attention."""

    max_span: int = Field(1024, ge=1, description="Longest span a head can learn, in tokens")
    ramp: int = Field(32, ge=1, description="Length of the soft mask's linear ramp, in tokens")
    init: float = Field(
        0.5, ge=0.0, le=1.0, description="Initial span of every head, as a fraction of max_span"
    )
    loss_coefficient: float = Field(
        2e-6,
        ge=0.0,
        description="Loss weight of the span penalty (mean span in tokens, summed over layers)",
    )


class AttentionConfig(_Node):
    """Which query/key pairs may meet (pattern + params) and how it is computed (backend).

    Causality is not part of this node: the model family decides it per stack (a decoder's
    self-attention is causal, an encoder's is not, cross-attention sees the whole source).
    """

    pattern: str = Field(
        "dense",
        description="Pattern: dense, sliding_window, dilated, strided, fixed, longformer, bigbird, "
        "variable, or deepspeed (a DeepSpeed sparse_attention section as params)",
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Pattern parameters, e.g. `{window: 256}`; causal is set by the model "
        "(docs/attention.md)",
    )
    backend: str = Field(
        "sdpa",
        description="Computed by: sdpa (dense patterns only), flex, blocksparse or reference",
    )
    block_size: int = Field(
        64,
        ge=16,
        le=128,
        description="Tile size in tokens of the blocksparse and flex backends and adaptive span",
    )
    adaptive_span: AdaptiveSpanConfig | None = Field(
        None, description="Learned per-head spans (decoder, pattern dense); null: off"
    )


# --------------------------------------------------------------------------- presets
# A preset is a small diff on ModelConfig's defaults (GPT-2 style) or on a named base.

_LLAMA: dict[str, Any] = dict(
    norm="rmsnorm",
    mlp="swiglu",
    positional="rope",
    bias=False,
    tie_embeddings=False,
    vocab_size=32000,
    norm_eps=1e-6,
)

PRESETS: dict[str, dict[str, Any]] = {
    # test size: every family, seconds on a CPU
    "tiny": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, max_seq_len=256),
    "tiny-encoder": dict(
        family="encoder", vocab_size=512, d_model=64, n_layers=2, n_heads=4, max_seq_len=256
    ),
    "tiny-encdec": dict(
        family="encoder_decoder", vocab_size=512, d_model=64, n_layers=2, n_heads=4, max_seq_len=256
    ),
    # small enough for the 2-core demo, big enough to learn something
    "mini": dict(
        vocab_size=8192,
        d_model=256,
        n_layers=4,
        n_heads=8,
        max_seq_len=1024,
        positional="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
    ),
    # GPT-2 (Radford et al. 2019)
    "gpt2-small": dict(),
    "gpt2-medium": dict(d_model=1024, n_layers=24, n_heads=16),
    "gpt2-large": dict(d_model=1280, n_layers=36, n_heads=20),
    # GPT-3 XL (Brown et al. 2020, table 2.1)
    "gpt3-1.3b": dict(d_model=2048, n_layers=24, n_heads=16, max_seq_len=2048),
    # LLaMA-style 7B (Touvron et al. 2023)
    "llama-7b": dict(_LLAMA, d_model=4096, n_layers=32, n_heads=32, max_seq_len=4096),
    # BERT-base-sized encoder (masked LM)
    "encoder-base": dict(family="encoder", vocab_size=30522, max_seq_len=512),
    # T5-small-sized encoder-decoder (seq2seq LM)
    "encdec-small": dict(
        family="encoder_decoder",
        vocab_size=32128,
        d_model=512,
        n_layers=6,
        n_heads=8,
        d_ff=2048,
        max_seq_len=512,
        positional="sinusoidal",
    ),
}


def preset_config(name: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a named preset, with field overrides applied on top."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


# --------------------------------------------------------------------------- sizing


def _norm_params(cfg: ModelConfig) -> int:
    return cfg.d_model * (2 if cfg.norm == "layernorm" and cfg.bias else 1)


def _attention_params(cfg: ModelConfig) -> int:
    d, kv = cfg.d_model, cfg.kv_heads * cfg.head_dim
    weights = d * d + 2 * d * kv + d * d  # q, k, v, out
    biases = (d + 2 * kv + d) if cfg.bias else 0
    return weights + biases


def _mlp_params(cfg: ModelConfig) -> int:
    d, f = cfg.d_model, cfg.ffn_dim
    if cfg.mlp == "gelu":
        return 2 * d * f + ((f + d) if cfg.bias else 0)
    return 3 * d * f + ((2 * f + d) if cfg.bias else 0)


def param_breakdown(cfg: ModelConfig) -> dict[str, int]:
    """Exact parameter counts by part, equal to what `models.build_model(cfg)` allocates."""
    d, v = cfg.d_model, cfg.vocab_size
    block = 2 * _norm_params(cfg) + _attention_params(cfg) + _mlp_params(cfg)
    cross_block = 3 * _norm_params(cfg) + 2 * _attention_params(cfg) + _mlp_params(cfg)
    parts = {
        "token_embedding": v * d,
        "position_embedding": cfg.max_seq_len * d if cfg.positional == "learned" else 0,
        "encoder": 0,
        "decoder": 0,
        "head": 0,
    }
    if cfg.family == "decoder":
        parts["decoder"] = cfg.n_layers * block + _norm_params(cfg)
    elif cfg.family == "encoder":
        parts["encoder"] = cfg.n_layers * block + _norm_params(cfg)
    else:
        parts["encoder"] = cfg.encoder_layers * block + _norm_params(cfg)
        parts["decoder"] = cfg.decoder_layers * cross_block + _norm_params(cfg)
    output = 0 if cfg.tie_embeddings else v * d
    if cfg.family == "encoder":
        # BERT-style MLM head: dense + activation + norm, then the vocabulary projection
        transform = d * d + (d if cfg.bias else 0) + _norm_params(cfg)
        parts["head"] = transform + output + (v if cfg.bias else 0)
    else:
        parts["head"] = output
    return parts


def count_params(cfg: ModelConfig, attention: AttentionConfig | None = None) -> int:
    """Total parameter count of the model `cfg` describes (exact); adaptive attention spans,
    when the attention config has them, add one parameter per head and decoder layer."""
    spans = cfg.n_heads * cfg.n_layers if attention and attention.adaptive_span else 0
    return sum(param_breakdown(cfg).values()) + spans


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matrix multiply per token: all but embedding lookups.

    With tied embeddings the vocabulary projection still costs a matmul, so it is counted.
    """
    parts = param_breakdown(cfg)
    n = count_params(cfg) - parts["token_embedding"] - parts["position_embedding"]
    if cfg.tie_embeddings:
        n += cfg.vocab_size * cfg.d_model
    return n


def flops_per_token(cfg: ModelConfig, seq_len: int, attn_density: float = 1.0) -> float:
    """Training FLOPs per token (forward + backward), as in PaLM's appendix B.

    6N for the weight matmuls plus 12 * L * H * Q * T for attention scores and values, where
    N = matmul_params, L layers, H heads, Q head dim, T the sequence length. A sparse
    pattern computes only a fraction of the (query, key) pairs: `attn_density` scales the
    attention term (1.0 is the dense convention PaLM uses, causal or not).
    """
    if not 0.0 <= attn_density <= 1.0:
        raise ValueError(f"attn_density must be in [0, 1], got {attn_density}")
    layers = cfg.encoder_layers + cfg.decoder_layers
    attention = 12 * layers * cfg.n_heads * cfg.head_dim * seq_len * attn_density
    if cfg.family == "encoder_decoder":
        attention += 12 * cfg.decoder_layers * cfg.n_heads * cfg.head_dim * seq_len  # cross
    return 6 * matmul_params(cfg) + attention
