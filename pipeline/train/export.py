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
    """The full fp32 weights of a checkpoint: DeepSpeed's fp32 master copy wherever one was
    kept (the model's own weights are bf16 or fp16 under mixed precision), consolidated from
    however many ranks' partitions hold it."""
    meta = read_meta(folder)
    ds = folder / DS_TAG
    if meta["zero_stage"] == 0:
        state = _zero0_state(ds, meta.get("param_groups"))
    elif _is_bf16_optimizer(ds):
        state = _bf16_optimizer_state(ds)
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DS_TAG)
    return {k: v.float() for k, v in state.items()}


def _zero0_state(ds: Path, param_groups: list[list[str]] | None) -> dict[str, torch.Tensor]:
    """ZeRO 0: the whole model is in one file; with fp16 the optimizer also saved its fp32
    master copies (`fp32_groups`), one list per parameter group, in the order the worker
    recorded by name in meta.json."""
    states = torch.load(ds / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    state = dict(states["module"])
    masters = (states.get("optimizer") or {}).get("fp32_groups")
    if masters and param_groups:
        for names, tensors in zip(param_groups, masters, strict=True):
            for name, tensor in zip(names, tensors, strict=True):
                state[name] = tensor.view(state[name].shape)
    return state


def _is_bf16_optimizer(ds: Path) -> bool:
    """Whether BF16_Optimizer wrote the optimizer files: ZeRO's carry a `zero_stage` mark
    (under bf16 both name their files bf16_zero_pp_rank_*)."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, ZERO_STAGE

    files = sorted(ds.glob("*_optim_states.pt"))
    if not files:
        return False
    optim = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)
    return ZERO_STAGE not in optim[OPTIMIZER_STATE_DICT]


def _bf16_optimizer_state(ds: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights of DeepSpeed's BF16_Optimizer (bf16 at ZeRO 0 and 1): each
    rank holds one flat partition per parameter group, laid out as ZeRO-1/2 lay theirs
    (parameters in order, the group padded at its end to 2 x ranks), but without the
    `zero_stage` mark that DeepSpeed's zero_to_fp32 looks for, so its ZeRO-2 merge is
    called directly (DeepSpeed is pinned; tests/test_gpu_path.py exports such a run)."""
    from deepspeed.utils import zero_to_fp32 as z

    files = sorted(ds.glob("*_optim_states.pt"), key=_rank_of)
    groups = []
    for f in files:
        optim = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        groups.append(optim[z.SINGLE_PARTITION_OF_FP32_GROUPS])
    models = z.parse_model_states(z.get_model_state_files(str(ds)))
    return z._get_fp32_state_dict_from_zero2_checkpoint(len(files), groups, models, False)


def _rank_of(path: Path) -> int:
    return int(path.name.split("_pp_rank_")[1].split("_")[0])


def export(
    target: str,
    out: str | Path,
    tracking_uri: str | None = None,
    fmt: str = "attnpipe",
    option: str = "export",
) -> dict[str, Any]:
    """Write the model of `target` (a checkpoint, a folder of checkpoints or an MLflow run
    id) into `out`, as attnpipe's folder or (fmt "hf") a transformers one: built in a
    temporary folder next to it, then moved into place, so `out` is either complete or
    absent."""
    from models.hf import NoEquivalent, hf_style, save_hf
    from models.pretrained import save_pretrained

    folder = resolve_resume(target, tracking_uri, option=option)
    meta = read_meta(folder)
    spec = validate_spec(meta["spec"], f"{folder}/meta.json")
    model = spec.model.architecture()
    if fmt == "hf":
        try:
            hf_style(model, spec.attention)
        except NoEquivalent as exc:
            raise UserError(f"--format hf: {exc}") from None
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    result = {"out": str(out), "checkpoint": str(folder), "step": meta["step"]}
    try:
        tokenizer = local_file(meta.get("data_dir", ""), TOKENIZER)
        state = consolidated_state(folder)
        if fmt == "hf":
            found = tokenizer if tokenizer.is_file() else None
            result.update(save_hf(staging, state, model, spec.attention, found))
        else:
            save_pretrained(
                staging,
                state,
                model,
                spec.attention,
                extra={
                    "family": spec.model.family,
                    "step": meta["step"],
                    "data_fingerprint": meta["data_fingerprint"],
                    "source_checkpoint": str(folder),
                },
            )
            if tokenizer.is_file():
                shutil.copy2(tokenizer, staging / TOKENIZER)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result
