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

# The modules that need torch load on first use: the spec validator and the CLI import only
# models.config, and `import torch` is most of a command's start (1.4 of 2.1 s). Generation
# is `models.generate` (a package attribute of that name would be the module once loaded).
_LAZY = {
    "KVCache": "models.layers",
    "attention_maps": "models.maps",
    "DecoderLM": "models.transformer",
    "EncoderDecoderLM": "models.transformer",
    "EncoderMLM": "models.transformer",
    "build_model": "models.transformer",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")


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
    "param_breakdown",
    "preset_config",
]
