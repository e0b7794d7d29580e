"""MLflow tracking: where runs go, and what each stage records."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any


def tracking_uri(uri: str | None, work_dir: str | Path) -> str:
    """The spec's tracking URI, or the embedded default: SQLite in the work directory."""
    if uri:
        return uri
    return f"sqlite:///{Path(work_dir).resolve() / 'mlflow.db'}"


def use_experiment(uri: str, name: str, work_dir: str | Path) -> None:
    """Point MLflow at `uri` and experiment `name`, creating it with its artifacts under
    <work_dir>/mlartifacts when the store is local (MLflow's default would be ./mlruns in
    whatever folder the command runs from)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(name) is None and not uri.startswith(("http:", "https:")):
        location = (Path(work_dir).resolve() / "mlartifacts").as_uri()
        mlflow.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(name)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: a resolved config as MLflow params."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


def log_preprocess(
    manifest: dict[str, Any],
    out_dir: Path | str,
    data_config: dict[str, Any],
    run_name: str,
    uri: str,
    experiment: str,
    work_dir: str | Path,
    nested: bool = False,
) -> str:
    """One MLflow run for a preprocessing job: counts, throughput, and the dataset input
    (its digest is the output's fingerprint, which training runs reference)."""
    import mlflow

    use_experiment(uri, experiment, work_dir)
    counts = manifest["counts"]
    with mlflow.start_run(run_name=run_name, nested=nested) as run:
        mlflow.set_tags(
            {
                "attnpipe.stage": "preprocess",
                "attnpipe.data_fingerprint": manifest["fingerprint"],
                "attnpipe.cache_hit": str(manifest.get("cache_hit", False)),
            }
        )
        params = {k: str(v)[:500] for k, v in flatten({"data": data_config}).items()}
        mlflow.log_params(params)
        metrics = {
            "documents_in": counts["documents_in"],
            "documents_out": counts["documents_out"],
            "tokens": counts["tokens"],
            "invalid_utf8_replaced": counts["invalid_utf8_replaced"],
            **{f"dropped_{k}": v for k, v in counts["dropped"].items()},
            **{f"{s}_samples": v["samples"] for s, v in manifest["splits"].items()},
            **{f"{s}_shards": len(v["shards"]) for s, v in manifest["splits"].items()},
        }
        if "tokens_per_second" in manifest:
            metrics["tokens_per_second"] = manifest["tokens_per_second"]
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=0)
        log_dataset(out_dir, manifest["fingerprint"], run_name, "preprocess")
        return run.info.run_id


def log_dataset(data_dir: Path | str, fingerprint: str, name: str, context: str) -> None:
    """A preprocessed output as an MLflow dataset input of the active run. Its digest is the
    output's fingerprint, so the preprocessing run and the training runs that read the same
    shards name the same dataset."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from pipeline.data.remote import is_uri

    location = str(data_dir) if is_uri(data_dir) else str(Path(data_dir).resolve())
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local path
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(location)
    dataset = MetaDataset(source=source, name=name, digest=fingerprint[:36])
    mlflow.log_input(dataset, context=context)


def log_model(export_dir: Path, register_name: str | None, tags: dict[str, str]) -> dict[str, Any]:
    """The exported model (safetensors + config + tokenizer) as an MLflow model of the
    active run, registered as a new version of `register_name` when given."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    import models

    signature = ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 32)]),
    )
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(Path(__file__).with_name("mlflow_model.py")),
        artifacts={"model": str(export_dir)},
        code_paths=[str(Path(models.__file__).parent)],
        signature=signature,
        pip_requirements=["torch", "safetensors", "tokenizers", "pydantic", "numpy"],
        registered_model_name=register_name,
        tags=tags,
    )
    version = getattr(info, "registered_model_version", None)
    if register_name and version is not None:
        client = mlflow.tracking.MlflowClient()
        for key, value in tags.items():
            client.set_model_version_tag(register_name, str(version), key, value)
    return {"model_uri": info.model_uri, "model_id": info.model_id, "version": version}
