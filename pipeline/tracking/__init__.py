"""MLflow tracking: where runs go, and what each stage records."""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import JobSpec

# MLflow 3 shows an experiment either as a GenAI app (traces, "Overview") or as model
# training (runs, models). The experiment says which in this tag; the values are the UI's
# (mlflow/server/js: "custom_model_development", "genai_development", ...).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT = "custom_model_development"
# The MLflow 3.17 UI ignores that tag while its GenAI / Model training switch is on (it is,
# in the released build): a page's view comes from this query parameter, else from the
# switch's last position in the browser's storage, GenAI by default. So every link attnpipe
# prints carries it.
UI_VIEW = "workflowType=machine_learning"
# Run params: the hyperparameters that tell runs apart, a line or two of text. MLflow (3.12
# and later) prints every run param above every image of an image chart, so a run with the
# whole spec as params hides its attention heatmaps under ~100 `key=value` pairs. The whole
# resolved spec goes with the run as `spec.yaml`.
HEADLINE_PARAMS = (
    "attention.pattern",
    "model.d_model",
    "model.n_layers",
    "data.seq_len",
    "training.steps",
    "training.global_batch_size",
    "training.optimizer.lr",
)
SOURCE_NAME = "attnpipe"
GIT_COMMIT_ENV = "ATTNPIPE_GIT_COMMIT"


def tracking_uri(uri: str | None, work_dir: str | Path) -> str:
    """The spec's tracking URI, or the embedded default: SQLite in the work directory."""
    if uri:
        return uri
    return f"sqlite:///{Path(work_dir).resolve() / 'mlflow.db'}"


def is_server(uri: str | None) -> bool:
    """Whether `uri` is a tracking server, which has a UI (a file or database store has
    none until `attnpipe ui` serves it)."""
    return bool(uri) and str(uri).startswith(("http://", "https://"))


def use_experiment(uri: str, name: str, work_dir: str | Path) -> str:
    """Point MLflow at `uri` and experiment `name` and return its id. A new experiment is a
    training experiment (EXPERIMENT_KIND_TAG), with its artifacts under <work_dir>/mlartifacts
    when the store is local (MLflow's default would be ./mlruns in whatever folder the command
    runs from); an existing one without a kind gets the tag, one with a kind keeps it."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    use_run_context()
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if not is_server(uri):
            location = (Path(work_dir).resolve() / "mlartifacts").as_uri()
        try:
            mlflow.create_experiment(
                name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT}
            )
        except MlflowException:  # another job created it meanwhile
            if mlflow.get_experiment_by_name(name) is None:
                raise
    elif EXPERIMENT_KIND_TAG not in experiment.tags:
        MlflowClient(uri).set_experiment_tag(
            experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT
        )
    return str(mlflow.set_experiment(name).experiment_id)


def ui_url(
    uri: str | None, experiment_id: str | None = None, run_id: str | None = None
) -> str | None:
    """The MLflow UI page of a run, else of an experiment's runs, else of the experiments,
    in the UI's model-training view; None for a store without a UI."""
    if not uri or not is_server(uri):
        return None
    page = "/#/experiments"
    if experiment_id is not None:
        page += f"/{experiment_id}/runs"
        if run_id is not None:
            page += f"/{run_id}"
    return f"{uri.rstrip('/')}{page}?{UI_VIEW}"


def stage_run_name(job: str, stage: str) -> str:
    """A stage's run is named after its job and the stage (`decoder-tiny-train`): a job's
    preprocessing and training runs are told apart in the runs list; a parent run (kind
    pipeline, compare, retrain) keeps the job's name."""
    return f"{job}-{stage}"


def git_commit() -> str | None:
    """The commit of the code that runs: ATTNPIPE_GIT_COMMIT where the submitter set it (a
    submitted job's working directory travels without .git), else this checkout's HEAD."""
    if commit := os.environ.get(GIT_COMMIT_ENV, "").strip():
        return commit
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def submission_env() -> dict[str, str]:
    """Environment variables a job submitted from here carries to its runs: the commit of
    this checkout, taken at submit time."""
    commit = git_commit()
    return {GIT_COMMIT_ENV: commit} if commit else {}


def source_tags() -> dict[str, str]:
    """MLflow's source tags of an attnpipe run: the program (MLflow's default is the entry
    script's path, a Ray temp folder on a cluster) and the commit, when known."""
    tags = {"mlflow.source.name": SOURCE_NAME}
    if commit := git_commit():
        tags["mlflow.source.git.commit"] = commit
    return tags


def use_run_context() -> None:
    """Set up this process for attnpipe's runs, whoever starts them (a stage, a parent run):

    - `source_tags` on every run, through MLflow's MLFLOW_RUN_CONTEXT (tags, as JSON, that
      `mlflow.start_run` puts over the ones it infers; tags passed to it win). Tags someone
      put there already stay.
    - No "View run ... / View experiment ..." lines from MLflow: it prints them as each run
      ends, the preprocessing run first, into its GenAI view; the training driver prints its
      run's link (`ui_url`) as the run starts.
    """
    from mlflow.environment_variables import MLFLOW_RUN_CONTEXT

    given = json.loads(MLFLOW_RUN_CONTEXT.get()) if MLFLOW_RUN_CONTEXT.defined else {}
    os.environ[MLFLOW_RUN_CONTEXT.name] = json.dumps({**source_tags(), **given})
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def log_spec(spec: JobSpec) -> None:
    """The resolved spec of the active run: HEADLINE_PARAMS as params, the whole of it as
    the artifact `spec.yaml` (what `attnpipe validate` prints)."""
    import mlflow

    from pipeline.config import resolved_yaml

    flat = flatten(spec.model_dump(mode="json"))
    mlflow.log_params({key: str(flat[key])[:500] for key in HEADLINE_PARAMS if key in flat})
    mlflow.log_text(resolved_yaml(spec), "spec.yaml")


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
    job: str,
    uri: str,
    experiment: str,
    work_dir: str | Path,
    nested: bool = False,
) -> str:
    """One MLflow run for a preprocessing job, `<job>-preprocess`: counts, throughput, and
    the dataset input (its digest is the output's fingerprint, which training runs
    reference)."""
    import mlflow

    use_experiment(uri, experiment, work_dir)
    counts = manifest["counts"]
    tags = {
        "attnpipe.stage": "preprocess",
        "attnpipe.job": job,
        "attnpipe.data_fingerprint": manifest["fingerprint"],
        "attnpipe.cache_hit": str(manifest.get("cache_hit", False)),
    }
    with mlflow.start_run(
        run_name=stage_run_name(job, "preprocess"), nested=nested, tags=tags
    ) as run:
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
        log_dataset(out_dir, manifest["fingerprint"], job, "preprocess")
        return run.info.run_id


def log_dataset(data_dir: Path | str, fingerprint: str, name: str, context: str) -> Any:
    """A preprocessed output as an MLflow dataset input of the active run, returned (metrics
    computed on it name it). Its digest is the output's fingerprint, so the preprocessing
    run and the training and evaluation runs that read the same shards name one dataset."""
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
    return dataset


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
