"""What every attnpipe run carries in MLflow, on a local SQLite store: the experiment's kind,
run names by stage, params a UI card can show, the source and commit, the UI links."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pipeline.config import load_spec, resolved_yaml
from pipeline.tracking import (
    EXPERIMENT_KIND_TAG,
    GIT_COMMIT_ENV,
    HEADLINE_PARAMS,
    TRAINING_EXPERIMENT,
    git_commit,
    log_preprocess,
    log_spec,
    stage_run_name,
    submission_env,
    tracking_uri,
    ui_url,
    use_experiment,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    """One SQLite store for the module (a new one costs seconds of schema migrations)."""
    return tracking_uri(None, tmp_path_factory.mktemp("store"))


@pytest.fixture(autouse=True)
def process_env(monkeypatch):
    """use_experiment sets MLflow's run context and link printing for the process: each
    test starts without them and leaves none behind."""
    for name in ("MLFLOW_RUN_CONTEXT", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", GIT_COMMIT_ENV):
        monkeypatch.delenv(name, raising=False)


def test_experiments_are_training_experiments_unless_they_say_otherwise(uri, tmp_path):
    from mlflow.tracking import MlflowClient

    new = use_experiment(uri, "fresh", tmp_path)
    client = MlflowClient(uri)
    assert client.get_experiment(new).tags[EXPERIMENT_KIND_TAG] == TRAINING_EXPERIMENT
    assert client.get_experiment(new).artifact_location.startswith(
        (tmp_path / "mlartifacts").resolve().as_uri()
    )
    older = client.create_experiment("made-before", artifact_location=(tmp_path / "a").as_uri())
    chosen = client.create_experiment(
        "a-genai-app", tags={EXPERIMENT_KIND_TAG: "genai_development"}
    )
    assert use_experiment(uri, "made-before", tmp_path) == older
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == TRAINING_EXPERIMENT
    use_experiment(uri, "a-genai-app", tmp_path)
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_ui_links_open_runs_in_the_model_training_view():
    view = "?workflowType=machine_learning"
    base = "http://127.0.0.1:5000"
    assert ui_url(f"{base}/", "3", "abc") == f"{base}/#/experiments/3/runs/abc{view}"
    assert ui_url(base, "3") == f"{base}/#/experiments/3/runs{view}"
    assert ui_url(base) == f"{base}/#/experiments{view}"
    assert ui_url("sqlite:////tmp/mlflow.db", "3", "abc") is None  # no UI to link to
    assert ui_url(None) is None


def manifest() -> dict:
    return {
        "fingerprint": "f" * 64,
        "cache_hit": True,
        "counts": {
            "documents_in": 3,
            "documents_out": 2,
            "tokens": 100,
            "invalid_utf8_replaced": 0,
            "dropped": {"empty": 1},
        },
        "splits": {"train": {"samples": 4, "shards": ["a"]}, "val": {"samples": 1, "shards": []}},
    }


def test_a_jobs_runs_are_named_by_stage_and_carry_source_and_commit(uri, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv(GIT_COMMIT_ENV, "0123abcd")  # what a submitted job is given
    assert submission_env() == {GIT_COMMIT_ENV: "0123abcd"}
    (tmp_path / "data").mkdir()
    pre = log_preprocess(manifest(), tmp_path / "data", {"seq_len": 32}, "decoder-tiny", uri,
                         "stages", tmp_path)  # fmt: skip
    with mlflow.start_run(run_name="decoder-tiny") as parent:  # a parent run, as run.py's
        pass
    for run_id, name in ((pre, "decoder-tiny-preprocess"), (parent.info.run_id, "decoder-tiny")):
        run = mlflow.get_run(run_id)
        assert run.info.run_name == name
        assert run.data.tags["mlflow.source.name"] == "attnpipe"  # not the entry script
        assert run.data.tags["mlflow.source.git.commit"] == "0123abcd"
    assert mlflow.get_run(pre).data.tags["attnpipe.stage"] == "preprocess"
    assert stage_run_name("decoder-tiny", "train") == "decoder-tiny-train"


def test_the_commit_is_this_checkouts_head_where_no_submitter_gave_one(tmp_path):
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=False
    ).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    assert git_commit() == head
    assert submission_env() == {GIT_COMMIT_ENV: head}


def test_the_run_context_keeps_tags_someone_set(uri, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_RUN_CONTEXT", '{"team": "lm", "mlflow.source.name": "mine"}')
    use_experiment(uri, "ctx", tmp_path)
    with mlflow.start_run() as run:
        pass
    tags = mlflow.get_run(run.info.run_id).data.tags
    assert tags["team"] == "lm" and tags["mlflow.source.name"] == "mine"


def test_a_training_run_has_headline_params_and_the_whole_spec(uri, tmp_path):
    """MLflow prints every run param above every image of the run's image cards: a few
    short ones leave the attention heatmaps in view (tests/test_ui.py looks)."""
    import mlflow

    spec = load_spec(ROOT / "jobs" / "decoder-tiny.yaml", [f"storage.work_dir={tmp_path}"])
    use_experiment(uri, "spec", tmp_path)
    with mlflow.start_run() as run:
        log_spec(spec)
    params = mlflow.get_run(run.info.run_id).data.params
    assert sorted(params) == sorted(HEADLINE_PARAMS)
    assert params["training.steps"] == "200" and params["attention.pattern"] == "dense"
    assert len(", ".join(f"{k}={v}" for k, v in params.items())) < 200  # 2-3 lines in a card
    text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/spec.yaml")
    assert text == resolved_yaml(spec)
