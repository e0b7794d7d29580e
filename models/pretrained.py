"""A trained model on disk: `model.safetensors` (fp32 weights) and `config.json` (the model
and attention nodes), the layout `attnpipe export` writes and MLflow models carry.

Only torch, safetensors and this package are needed to load one: no DeepSpeed, no Ray.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.config import AttentionConfig, ModelConfig
from models.transformer import build_model

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_pretrained(
    folder: str | Path,
    state: dict[str, torch.Tensor],
    model: ModelConfig,
    attention: AttentionConfig,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write `state` and the configs into `folder` (which must exist). Tied weights are
    stored once per name, as independent tensors (safetensors keeps no aliases)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    config = {
        "model": model.model_dump(mode="json"),
        "attention": attention.model_dump(mode="json"),
        **(extra or {}),
    }
    (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))


def load_config(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / CONFIG).read_text())


def load_pretrained(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model saved in `folder`, in eval mode, every weight checked against its config."""
    from safetensors.torch import load_file

    config = load_config(folder)
    model = build_model(ModelConfig(**config["model"]), AttentionConfig(**config["attention"]))
    model.load_state_dict(load_file(str(Path(folder) / WEIGHTS), device=str(device)))
    return model.to(device).eval()


def load_for_text(folder: str | Path) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer, family) of an exported folder: what `models.generate.complete`
    takes (the MLflow model, `attnpipe generate` and the evaluate job's samples)."""
    from tokenizers import Tokenizer

    family = load_config(folder)["model"]["family"]
    tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    return load_pretrained(folder), tokenizer, family
