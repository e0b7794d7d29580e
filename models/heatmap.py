"""Attention heatmaps: render captured attention probabilities as PNG images with token
labels, one image per (layer, head), for any backend (see models.maps)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from models.maps import attention_maps


def render_heatmap(
    probs: Tensor,  # (Lq, Lk)
    path: str | Path,
    query_labels: Sequence[str] | None = None,
    key_labels: Sequence[str] | None = None,
    title: str = "",
) -> Path:
    """Write one heatmap PNG: rows are queries, columns keys, colour the weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = probs.detach().float().cpu().numpy()
    lq, lk = data.shape
    size = max(4.0, min(16.0, 0.28 * max(lq, lk) + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(data, cmap="viridis", vmin=0.0, vmax=max(float(data.max()), 1e-9))
    for labels, set_ticks, set_labels, n, rot in (
        (query_labels, ax.set_yticks, ax.set_yticklabels, lq, 0),
        (key_labels, ax.set_xticks, ax.set_xticklabels, lk, 90),
    ):
        if labels is not None:
            set_ticks(range(n))
            set_labels(list(labels), rotation=rot, fontsize=7)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def attention_heatmaps(
    model: nn.Module,
    inputs: dict[str, Any],
    tokens: Sequence[str],
    out_dir: str | Path,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    stack: str = "decoder",
    source_tokens: Sequence[str] | None = None,
) -> list[Path]:
    """Capture the chosen layers and heads for a short input (batch element 0) and write
    one PNG each, named `{stack}-layer{L}-head{H}.png`. `tokens` label the queries (and
    the keys, unless `source_tokens` labels cross-attention keys)."""
    maps = attention_maps(model, inputs, stack=stack, layers=layers, heads=heads)
    paths = []
    for layer, probs in maps.items():
        head_ids = list(heads) if heads is not None else list(range(probs.shape[1]))
        for i, head in enumerate(head_ids):
            name = f"{stack}-layer{layer}-head{head}.png"
            paths.append(
                render_heatmap(
                    probs[0, i],
                    Path(out_dir) / name,
                    tokens,
                    source_tokens if source_tokens is not None else tokens,
                    title=f"{stack} layer {layer}, head {head}",
                )
            )
    return paths
