"""Held-out evaluation of a trained model (an exported folder, models/pretrained.py): the
loss and perplexity on the first batches of a preprocessed output's validation split, the
same samples for every model evaluated, so two models compare on equal terms."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from pipeline.data.reader import ShardReader
from pipeline.data.remote import local_copy
from pipeline.data.shards import read_manifest
from pipeline.train.objectives import Objective


@torch.no_grad()
def evaluate_model(
    model_dir: str | Path,
    data_dir: str | Path,
    batches: int = 20,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """{"loss", "perplexity", "tokens", "samples"} of the model in `model_dir` on the
    validation split of `data_dir` (masked-LM corruption seeded, so it repeats exactly)."""
    from models.pretrained import load_config, load_pretrained

    model = load_pretrained(model_dir)
    data_dir = local_copy(data_dir)  # a URI: this node's mirror of it
    manifest = read_manifest(data_dir)
    family = load_config(model_dir)["model"]["family"]
    objective = Objective(
        family=family,
        special_ids=manifest["special_ids"],
        max_source_len=manifest.get("max_source_len"),
        vocab_size=manifest["vocab_size"],
    )
    reader = ShardReader(data_dir, "val", seed=seed, shuffle=False)
    batches = min(batches, max(1, len(reader) // batch_size))
    total, count = 0.0, 0
    for i in range(batches):
        gen = torch.Generator().manual_seed(seed * 7_919 + i)
        loss, n = objective.loss(model, reader.next_batch(batch_size), gen)
        total, count = total + float(loss), count + n
    loss = total / max(count, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "tokens": count,
        "samples": batches * batch_size,
    }
