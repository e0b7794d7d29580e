"""The training driver: checks the job against the cluster, opens the MLflow run, and runs
the workers with Ray Train's TorchTrainer.

Ray Train owns the worker group: placement (ScalingConfig), restarts after a worker or node
failure (FailureConfig), and the checkpoints each report registers (CheckpointConfig keeps
the last K). The driver owns what is about the job as a whole: the MLflow run, its params
and tags, the dataset lineage, and after the fit the checkpoints and the model.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.config import JobSpec
from pipeline.data.remote import is_uri, local_copy
from pipeline.data.shards import read_manifest
from pipeline.errors import UserError
from pipeline.train.checkpoint import latest_complete, read_meta, resolve_resume
from pipeline.train.worker import WorkerConfig, train_loop_per_worker


class TrainingFailed(RuntimeError):
    """The workers failed more often than training.max_failures allows."""


def check_cluster(spec: JobSpec) -> None:
    """Fail before any worker starts when the Ray cluster cannot hold the workers asked for."""
    import ray

    total = ray.cluster_resources()
    check_resources(spec, {k: total.get(k, 0.0) for k in ("GPU", "CPU")}, "the Ray cluster")


def check_resources(spec: JobSpec, have: dict[str, float], where: str) -> None:
    """One line when the workers need more GPUs or CPUs than `where` has."""
    r = spec.resources
    for key, each, field in (
        ("GPU", r.gpus_per_worker, "resources.gpus_per_worker"),
        ("CPU", r.cpus_per_worker, "resources.cpus_per_worker"),
    ):
        need = each * r.num_workers
        if key in have and need > have[key]:
            raise UserError(
                f"{field}: {r.num_workers} workers x {each:g} {key} = {need:g} {key}s requested, "
                f"{where} has {have[key]:g}"
            )


def check_resume(spec: JobSpec, folder: Path) -> None:
    meta = read_meta(folder)
    n = spec.resources.num_workers
    if meta["world_size"] != n and meta["zero_stage"] > 0:
        raise UserError(
            f"--resume-from {folder}: written by {meta['world_size']} workers with ZeRO stage "
            f"{meta['zero_stage']}; resume it with resources.num_workers={meta['world_size']}"
        )


def resume_target(spec: JobSpec, resume_from: str | None, uri: str) -> Path | None:
    """The checkpoint `--resume-from` names, once it is known to exist, be complete and fit
    the spec: a check that needs no Ray, so `attnpipe run` makes it before starting one."""
    resume = resolve_resume(resume_from, uri) if resume_from else None
    if resume is not None:
        check_resume(spec, resume)
    return resume


def preflight(spec: JobSpec, resume_from: str | None, uri: str) -> Path | None:
    """Everything that can be checked before any data is read or worker started: the
    cluster holds the workers, the resume target exists, is complete and fits."""
    check_cluster(spec)
    return resume_target(spec, resume_from, uri)


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_train(
    spec: JobSpec,
    data_dir: Path | str,
    uri: str,
    *,
    resume_from: str | None = None,
    progress: Callable[[str], None] = print,
    faults: dict[str, Any] | None = None,
    nested: bool = False,
    init_from: str | None = None,
) -> dict[str, Any]:
    """Train `spec` on the preprocessed data in `data_dir`, logging to MLflow at `uri`.
    Returns the final metrics, the checkpoint folder, the MLflow run id and the events."""
    import mlflow
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.tracking import log_dataset, log_spec, stage_run_name, ui_url, use_experiment

    resume = preflight(spec, resume_from, uri)
    manifest = read_manifest(local_copy(data_dir))  # a URI: this node's mirror of it
    r, t = spec.resources, spec.training
    storage = (Path(spec.storage.work_dir) / "runs").resolve()
    name = f"{spec.job.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = storage / name
    resolved = spec.model_dump(mode="json")

    use_experiment(uri, spec.tracking.experiment, spec.storage.work_dir)
    tags = {
        "attnpipe.stage": "train",
        "attnpipe.job": spec.job.name,
        "attnpipe.data_fingerprint": manifest["fingerprint"],
        "attnpipe.attention_pattern": spec.attention.pattern,
        "attnpipe.attention_backend": spec.attention.backend,
        "attnpipe.checkpoint_dir": str(run_dir),
        "attnpipe.ray_run_name": name,
    }
    submission = os.environ.get("RAY_JOB_SUBMISSION_ID") or _ray_submission_id()
    if submission:
        tags["attnpipe.ray_submission_id"] = submission
    if resume is not None:
        tags["attnpipe.resumed_from"] = str(resume)
    if init_from is not None:
        tags["attnpipe.init_from"] = str(init_from)
    run_name = stage_run_name(spec.job.name, "train")
    with mlflow.start_run(
        run_name=run_name,
        nested=nested,
        tags=tags,
        log_system_metrics=spec.tracking.system_metrics,
    ) as run:
        log_spec(spec)
        if url := ui_url(uri, run.info.experiment_id, run.info.run_id):
            progress(f"View run {run_name} at: {url}")
        progress(f"MLflow run {run.info.run_id}; checkpoints in {run_dir}")
        config = WorkerConfig(
            spec=resolved,
            data_dir=str(data_dir) if is_uri(data_dir) else str(Path(data_dir).resolve()),
            run_dir=str(run_dir),
            tracking_uri=uri,
            mlflow_run_id=run.info.run_id,
            resume_from=str(resume) if resume else None,
            faults=faults or {},
            init_from=init_from,
        )
        use_gpu = r.gpus_per_worker > 0
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=asdict(config),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=r.num_workers,
                use_gpu=use_gpu,
                resources_per_worker={"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker},
                placement_strategy=r.placement,
            ),
            run_config=RunConfig(
                name=name,
                storage_path=str(storage),
                failure_config=FailureConfig(max_failures=t.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            ),
        )
        started = time.perf_counter()
        try:
            result = trainer.fit()
        except Exception as exc:  # Ray's TrainingFailedError: the workers' error, summarised
            mlflow.set_tag("attnpipe.error", str(exc).splitlines()[0][:500])
            raise TrainingFailed(f"training failed: {str(exc).splitlines()[0]}") from exc
        seconds = time.perf_counter() - started
        events = read_events(run_dir)
        last = latest_complete(run_dir)
        mlflow.log_metric("train/wall_time_s", seconds, step=t.steps)
        resumes = [e for e in events if e["event"] == "resume"]
        if resumes:
            mlflow.set_tag("attnpipe.resumes", json.dumps([e["step"] for e in resumes]))
        log_dataset(data_dir, manifest["fingerprint"], spec.job.name, "training")
        log_heatmaps(run_dir)
        if last is not None and spec.tracking.log_checkpoints != "none":
            kept = [last] if spec.tracking.log_checkpoints == "last" else _all(run_dir)
            for folder in kept:
                mlflow.log_artifacts(str(folder), f"checkpoints/{folder.name}")
        model = None
        if last is not None:
            progress("exporting and registering the model")
            model = log_trained_model(spec, last, run_dir, result.metrics or {})
        return {
            "model": model,
            "mlflow_run_id": run.info.run_id,
            "metrics": dict(result.metrics or {}),
            "checkpoint": str(last) if last else None,
            "run_dir": str(run_dir),
            "events": events,
            "seconds": seconds,
        }


def _all(run_dir: Path) -> list[Path]:
    from pipeline.train.checkpoint import NAME, is_complete

    return sorted(p for p in run_dir.iterdir() if NAME.match(p.name) and is_complete(p))


def log_trained_model(
    spec: JobSpec, checkpoint: Path, run_dir: Path, metrics: dict[str, Any]
) -> dict[str, Any]:
    """Consolidate the final checkpoint, log it as the run's MLflow model and register it
    under tracking.register_name (default: the job name)."""
    from pipeline.tracking import log_model
    from pipeline.train.export import export

    out = run_dir / "model"
    if not out.exists():
        export(str(checkpoint), out)
    tags = {
        "attnpipe.job": spec.job.name,
        "attnpipe.step": str(read_meta(checkpoint)["step"]),
        "attnpipe.data_fingerprint": read_meta(checkpoint)["data_fingerprint"],
        "attnpipe.attention_pattern": spec.attention.pattern,
    }
    if "val/loss" in metrics:
        tags["attnpipe.val_loss"] = f"{metrics['val/loss']:.6f}"
    name = spec.tracking.register_name or spec.job.name
    return {**log_model(out, name, tags), "name": name, "export_dir": str(out)}


def log_heatmaps(run_dir: Path) -> int:
    """The attention heatmaps the workers drew at each evaluation, as MLflow images with
    their step (the UI shows them per step): key `attention/<stack>-layer<L>-head<H>`."""
    import mlflow
    import numpy as np
    from PIL import Image

    count = 0
    for folder in sorted((run_dir / "heatmaps").glob("step-*")):
        step = int(folder.name.split("-")[1])
        for png in sorted(folder.glob("*.png")):
            with Image.open(png) as image:
                mlflow.log_image(
                    np.asarray(image.convert("RGB")), key=f"attention/{png.stem}", step=step
                )
            count += 1
    return count


def _ray_submission_id() -> str | None:
    """The submission id of the Ray job this driver runs in, whoever submitted it (Ray
    passes it in the job config, not as a variable of its own)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None
