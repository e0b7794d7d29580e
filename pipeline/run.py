"""`attnpipe run`: execute a job spec on this machine, on an embedded Ray and MLflow."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.config import JobSpec
from pipeline.errors import UserError
from pipeline.tracking import log_preprocess, tracking_uri

RUNNABLE = ("preprocess",)


def progress_printer() -> Any:
    """Timestamped progress lines on stderr (rich on a terminal, plain in logs)."""
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    start = time.perf_counter()

    def show(message: str) -> None:
        console.print(f"[{time.perf_counter() - start:7.1f}s] {message}")

    return show


def start_local_ray(num_cpus: int | None = None) -> None:
    """An embedded Ray in this process, unless it is already connected to one. Its dashboard
    stays off. Ray resolves a loopback node address to the machine's own address, so its
    internal ports follow Ray's defaults (token authentication is on by default in 2.60)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
        )


def data_dir(spec: JobSpec) -> Path:
    return Path(spec.storage.work_dir) / "data" / spec.job.name


def run_preprocess(spec: JobSpec, parallelism: int = 2) -> dict[str, Any]:
    from pipeline.data.preprocess import preprocess

    show = progress_printer()
    start_local_ray(parallelism)
    out = data_dir(spec)
    manifest = preprocess(
        spec.data,
        out,
        vocab_size=spec.data.tokenizer.vocab_size or spec.model.vocab_size,
        paired=spec.model.family == "encoder_decoder",
        parallelism=parallelism,
        progress=show,
    )
    uri = tracking_uri(spec.tracking.uri, spec.storage.work_dir)
    run_id = log_preprocess(
        manifest,
        out,
        spec.data.model_dump(mode="json"),
        spec.job.name,
        uri,
        spec.tracking.experiment,
    )
    show(f"MLflow run {run_id} in {uri}")
    return {**manifest, "mlflow_run_id": run_id, "out_dir": str(out)}


def run_job(spec: JobSpec) -> dict[str, Any]:
    if spec.job.kind not in RUNNABLE:
        raise UserError(
            f"job.kind: {spec.job.kind!r} jobs cannot be run yet; runnable kinds: "
            + ", ".join(RUNNABLE)
        )
    return run_preprocess(spec)
