"""`kind: preprocess`: the job's data node into shards (pipeline/data/), logged to MLflow.
The other kinds preprocess through `run_preprocess` too: a cache hit when the data's
fingerprint matches the output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import DataNode, JobSpec
from pipeline.kinds.base import Job, Kind


def data_dir(spec: JobSpec) -> Path | str:
    """The job's preprocessed data: a local folder, or a URI (`storage.data`)."""
    from pipeline.data.remote import is_uri, join

    base = spec.storage.data
    if base is not None and is_uri(base):
        return join(base, spec.job.name)
    return Path(base or Path(spec.storage.work_dir) / "data") / spec.job.name


def run_preprocess(
    spec: JobSpec,
    show: Any,
    uri: str,
    parallelism: int | None = None,
    nested: bool = False,
    log_cached: bool = True,
    data: DataNode | None = None,
    out: Path | str | None = None,
    paired: bool | None = None,
) -> dict[str, Any]:
    """Preprocess the job's data (a cache hit when its fingerprint matches the output) and
    log the run to MLflow at `uri`; `log_cached=False` logs nothing for a cache hit. `data`, `out`
    and `paired` replace the spec's data node, its output folder and its model's need."""
    from pipeline.data.preprocess import preprocess
    from pipeline.tracking import log_preprocess

    data = data or spec.data
    out = out or data_dir(spec)
    manifest = preprocess(
        data,
        out,
        vocab_size=data.tokenizer.vocab_size or spec.model.vocab_size,
        paired=spec.model.family == "encoder_decoder" if paired is None else paired,
        parallelism=parallelism,
        progress=show,
    )
    if manifest.get("cache_hit") and not log_cached:
        return {**manifest, "mlflow_run_id": None, "out_dir": str(out)}
    run_id = log_preprocess(
        manifest,
        out,
        data.model_dump(mode="json"),
        spec.job.name,
        uri,
        spec.tracking.experiment,
        spec.storage.work_dir,
        nested=nested,
    )
    show(f"MLflow run {run_id} in {uri}")
    return {**manifest, "mlflow_run_id": run_id, "out_dir": str(out)}


def summary(result: dict[str, Any]) -> dict[str, Any]:
    counts = result["counts"]
    return {
        "out_dir": result["out_dir"],
        "cache_hit": result["cache_hit"],
        "documents": counts["documents_out"],
        "tokens": counts["tokens"],
        "dropped": counts["dropped"],
        "samples": {k: v["samples"] for k, v in result["splits"].items()},
        "mlflow_run_id": result["mlflow_run_id"],
    }


def _run(job: Job) -> dict[str, Any]:
    return run_preprocess(job.spec, job.show, job.uri)


KIND = Kind("preprocess", _run, trains=False, summary=summary)
