"""Attention: patterns (which query/key pairs meet) kept apart from backends (how)."""

from models.attention.backends import (
    BACKENDS,
    Backend,
    BatchGeometry,
    backends_for,
    dense_bias,
    make_backend,
    register_backend,
)
from models.attention.patterns import (
    PATTERNS,
    AttentionSpecError,
    Dense,
    Pattern,
    make_pattern,
    register_pattern,
)

__all__ = [
    "BACKENDS",
    "PATTERNS",
    "AttentionSpecError",
    "Backend",
    "BatchGeometry",
    "Dense",
    "Pattern",
    "backends_for",
    "dense_bias",
    "make_backend",
    "make_pattern",
    "register_backend",
    "register_pattern",
]
