"""`attnpipe export`: a checkpoint's weights, consolidated from however many ZeRO
partitions wrote them, as safetensors + config.json + the tokenizer (models/pretrained.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.config import validate_spec
from pipeline.data.remote import local_file
from pipeline.errors import UserError
from pipeline.train.checkpoint import DS_TAG, read_meta, resolve_resume

TOKENIZER = "tokenizer.json"


def consolidated_state(folder: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a checkpoint. ZeRO 1-3 rebuild them from the optimizer's
    fp32 partitions (DeepSpeed's zero_to_fp32); ZeRO 0 keeps them whole in the model file."""
    meta = read_meta(folder)
    if meta["zero_stage"] == 0:
        state = torch.load(
            folder / DS_TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
        )["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DS_TAG)
    return {k: v.float() for k, v in state.items()}


def export(target: str, out: str | Path, tracking_uri: str | None = None) -> dict[str, Any]:
    """Write the model of `target` (a checkpoint, a folder of checkpoints or an MLflow run
    id) into `out`: built in a temporary folder next to it, then moved into place, so `out`
    is either complete or absent."""
    from models.pretrained import save_pretrained

    folder = resolve_resume(target, tracking_uri, option="export")
    meta = read_meta(folder)
    spec = validate_spec(meta["spec"], f"{folder}/meta.json")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save_pretrained(
            staging,
            consolidated_state(folder),
            spec.model.architecture(),
            spec.attention,
            extra={
                "family": spec.model.family,
                "step": meta["step"],
                "data_fingerprint": meta["data_fingerprint"],
                "source_checkpoint": str(folder),
            },
        )
        tokenizer = local_file(meta.get("data_dir", ""), TOKENIZER)
        if tokenizer.is_file():
            shutil.copy2(tokenizer, staging / TOKENIZER)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"out": str(out), "checkpoint": str(folder), "step": meta["step"]}
