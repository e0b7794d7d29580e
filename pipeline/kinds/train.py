"""`kind: train` trains on the job's preprocessed data (preprocessing it first when it is
missing: a cache hit when it exists); `kind: pipeline` does both under one parent MLflow
run, with a nested run per stage."""

from __future__ import annotations

from typing import Any

from pipeline.kinds.base import Job, Kind
from pipeline.kinds.preprocess import data_dir, run_preprocess


def run_train_job(job: Job) -> dict[str, Any]:
    run_preprocess(job.spec, job.show, job.uri, log_cached=False)  # a cache hit once it exists
    return _train(job, nested=False)


def run_pipeline(job: Job) -> dict[str, Any]:
    import mlflow

    from pipeline.tracking import use_experiment

    spec = job.spec
    use_experiment(job.uri, spec.tracking.experiment, spec.storage.work_dir)
    with mlflow.start_run(run_name=spec.job.name, tags={"attnpipe.stage": "pipeline"}) as parent:
        prep = run_preprocess(spec, job.show, job.uri, nested=True)
        result = _train(job, nested=True)
        return {**result, "parent_run_id": parent.info.run_id, "preprocess": prep}


def _train(job: Job, nested: bool) -> dict[str, Any]:
    from pipeline.train.driver import run_train

    return run_train(
        job.spec,
        data_dir(job.spec),
        job.uri,
        resume_from=job.resume_from,
        progress=job.show,
        faults=job.faults,
        nested=nested,
    )


def summary(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("mlflow_run_id", "checkpoint", "run_dir", "metrics", "seconds")
    return {
        **{k: result[k] for k in keys},
        "resumed_at": [e["step"] for e in result["events"] if e["event"] == "resume"],
    }


TRAIN = Kind("train", run_train_job, trains=True, summary=summary)
PIPELINE = Kind("pipeline", run_pipeline, trains=True, summary=summary)
