"""`attnpipe run`: execute a job spec on this machine, on an embedded Ray and MLflow. The
job's kind (pipeline/kinds/) runs it; this module checks what a training kind needs before
Ray starts, starts Ray, and stops it."""

from __future__ import annotations

from typing import Any

from pipeline.config import JobSpec, checked
from pipeline.kinds import Job, check_job, kind_of
from pipeline.runtime import (
    joins_a_cluster,
    print_worker_output_once,
    progress_printer,
    start_local_ray,
    stop_local_ray,
)
from pipeline.tracking import tracking_uri


def run_job(
    spec: JobSpec, resume_from: str | None = None, faults: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run a job here, by its kind: `preprocess` writes shards; `train` trains on them
    (preprocessing first when they are missing: a cache hit when they exist); `pipeline`
    does both under one parent MLflow run with a nested run per stage; `evaluate`,
    `retrain` and `compare` as pipeline/kinds/ describes."""
    kind = kind_of(checked(spec, check_job, f"job {spec.job.name}"))
    uri = tracking_uri(spec.tracking.uri, spec.storage.work_dir)
    if kind.trains:
        from pipeline.train.driver import check_resources, resume_target

        # a wrong target, or GPUs this machine lacks for the Ray it would start, is one line
        # in seconds, not after a local Ray has started; run_train gets the folder found
        resume = resume_target(spec, resume_from, uri)
        resume_from = str(resume) if resume is not None else None
        if spec.resources.gpus_per_worker and not joins_a_cluster():
            import torch

            check_resources(spec, {"GPU": torch.cuda.device_count()}, "this machine")
    show = progress_printer()
    print_worker_output_once()
    started = (
        start_local_ray(log_to_driver=True, cpu_training=spec.resources.gpus_per_worker == 0)
        if kind.trains
        else start_local_ray(2)  # no training workers
    )
    try:
        if kind.trains:
            from pipeline.train.driver import check_cluster

            check_cluster(spec)  # before any preprocessing
        return kind.run(Job(spec, show, uri, resume_from, faults))
    finally:
        if started:  # also stops the thread that forwards the workers' output
            stop_local_ray()
