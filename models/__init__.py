"""attnpipe's model package: the transformer family and its attention patterns and backends."""

from models.config import (
    PRESETS,
    AttentionConfig,
    ModelConfig,
    count_params,
    flops_per_token,
    param_breakdown,
    preset_config,
)
from models.generate import generate, generate_seq2seq
from models.layers import KVCache
from models.maps import attention_maps
from models.transformer import DecoderLM, EncoderDecoderLM, EncoderMLM, build_model

__all__ = [
    "PRESETS",
    "AttentionConfig",
    "DecoderLM",
    "EncoderDecoderLM",
    "EncoderMLM",
    "KVCache",
    "ModelConfig",
    "attention_maps",
    "build_model",
    "count_params",
    "flops_per_token",
    "generate",
    "generate_seq2seq",
    "param_breakdown",
    "preset_config",
]
