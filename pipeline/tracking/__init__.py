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
    out_dir: Path,
    data_config: dict[str, Any],
    run_name: str,
    uri: str,
    experiment: str,
) -> str:
    """One MLflow run for a preprocessing job: counts, throughput, and the dataset input
    (its digest is the output's fingerprint, which training runs reference)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    counts = manifest["counts"]
    with mlflow.start_run(run_name=run_name) as run:
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
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local path
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str(out_dir.resolve()))
        dataset = MetaDataset(
            source=source,
            name=run_name,
            digest=manifest["fingerprint"][:36],
        )
        mlflow.log_input(dataset, context="preprocess")
        return run.info.run_id
