"""Training checkpoints: what one holds, when it counts as complete, and which one a resume
takes.

A checkpoint is one folder (Ray Train merges every worker's part into it):

    meta.json                 step, world size, ZeRO stage, the resolved job spec (rank 0)
    ds/...                    DeepSpeed's files: model states, each rank's ZeRO partition
    rank-00000.pt             that rank's reader state and RNG states
    rank-00000.done           written last by each rank, after all its files

It is complete when meta.json exists and every rank of its world size left its `.done`
marker, so a crash in the middle of a save (some ranks written, some not) leaves a folder
that a resume skips in favour of the previous complete one.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import UserError

DS_TAG = "ds"
NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_rank_state(folder: Path, rank: int, state: dict[str, Any]) -> None:
    """This rank's own state, then its completion marker (both under temporary names first)."""
    path = folder / f"rank-{rank:05d}.pt"
    torch.save(state, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    (folder / f"rank-{rank:05d}.done").write_text("ok\n")


def read_rank_state(folder: Path, rank: int) -> dict[str, Any]:
    return torch.load(folder / f"rank-{rank:05d}.pt", weights_only=False)


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    tmp = folder / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(tmp, folder / "meta.json")


def read_meta(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "meta.json").read_text())


def is_complete(folder: Path) -> bool:
    try:
        meta = read_meta(folder)
    except (OSError, ValueError):
        return False
    return all((folder / f"rank-{r:05d}.done").exists() for r in range(meta["world_size"]))


def latest_complete(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder under `run_dir` (searched recursively, so a Ray
    run folder and a folder of checkpoints both work), or None."""
    found = []
    for meta in run_dir.rglob("meta.json"):
        folder = meta.parent
        if NAME.match(folder.name) and is_complete(folder):
            found.append((read_meta(folder)["step"], str(folder)))
    return Path(max(found)[1]) if found else None


def resolve_resume(
    target: str, tracking_uri: str | None = None, option: str = "--resume-from"
) -> Path:
    """A checkpoint folder from `--resume-from` (or `export`'s argument): a checkpoint
    folder, a folder holding checkpoints (the newest complete one), or an MLflow run id of
    a training run."""
    path = Path(target)
    if not path.exists() and re.fullmatch(r"[0-9a-f]{32}", target) and tracking_uri:
        path = Path(_run_checkpoint_dir(target, tracking_uri, option))
    if not path.exists():
        raise UserError(f"{option} {target}: no such checkpoint, folder or MLflow run")
    if (path / "meta.json").exists():
        if not is_complete(path):
            raise UserError(f"{option} {target}: an incomplete checkpoint (a save was cut)")
        return path.resolve()
    found = latest_complete(path)
    if found is None:
        raise UserError(f"{option} {target}: holds no complete checkpoint")
    return found.resolve()


def _run_checkpoint_dir(run_id: str, tracking_uri: str, option: str) -> str:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(tracking_uri).get_run(run_id)
    except MlflowException:
        raise UserError(f"{option} {run_id}: no such MLflow run in {tracking_uri}") from None
    folder = run.data.tags.get("attnpipe.checkpoint_dir")
    if not folder:
        raise UserError(f"{option} {run_id}: the MLflow run has no attnpipe checkpoints")
    return folder
