"""Attention maps: the attention probabilities of chosen layers and heads for a small input.

Works with every backend: a layer marked for capture recomputes its probabilities densely
from the same queries, keys and mask the backend used, so keep inputs short.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from models.layers import Attention

STACKS = ("decoder", "encoder", "cross")


def attention_layers(model: nn.Module, stack: str) -> list[Attention]:
    if stack not in STACKS:
        raise ValueError(f"unknown stack {stack!r}; choose one of {', '.join(STACKS)}")
    owner = getattr(model, "encoder" if stack == "encoder" else "decoder", None)
    if owner is None:
        raise ValueError(f"{type(model).__name__} has no {stack} stack")
    layers = [b.cross_attn if stack == "cross" else b.attn for b in owner.blocks]
    if any(layer is None for layer in layers):
        raise ValueError(f"{type(model).__name__} has no cross-attention")
    return layers


@contextmanager
def capture_attention(
    model: nn.Module, stack: str, layers: Sequence[int]
) -> Iterator[dict[int, Attention]]:
    """Within the block, the chosen layers keep their last attention probabilities."""
    modules = attention_layers(model, stack)
    chosen = {i: modules[i] for i in layers}
    for m in chosen.values():
        m.capture, m.captured = True, None
    try:
        yield chosen
    finally:
        for m in chosen.values():
            m.capture = False


@torch.no_grad()
def attention_maps(
    model: nn.Module,
    inputs: dict[str, Any],
    stack: str = "decoder",
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> dict[int, Tensor]:
    """{layer: (B, heads, Lq, Lk) probabilities} for `model(**inputs)`; rows sum to 1."""
    n_layers = len(attention_layers(model, stack))
    layers = list(range(n_layers)) if layers is None else list(layers)
    for i in layers:
        if not 0 <= i < n_layers:
            raise ValueError(f"layer {i} out of range: the {stack} stack has {n_layers} layers")
    was_training = model.training
    model.eval()
    try:
        with capture_attention(model, stack, layers) as chosen:
            model(**inputs)
            maps = {i: m.captured for i, m in chosen.items()}
    finally:
        model.train(was_training)
    out: dict[int, Tensor] = {}
    for i, probs in maps.items():
        assert probs is not None
        out[i] = probs if heads is None else probs[:, list(heads)]
    return out
