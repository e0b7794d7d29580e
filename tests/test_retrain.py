"""`kind: retrain` against an embedded Ray and a local MLflow registry: the first model
becomes champion, unchanged data is skipped, a better challenger is promoted and a worse
one is not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from corpus import write_corpus
from test_train import tiny_spec

from pipeline.tracking import tracking_uri


@pytest.fixture(scope="module")
def ray_cluster():
    from pipeline.run import start_local_ray, stop_local_ray

    start_local_ray(2)
    yield
    stop_local_ray()


def retrain(work: Path, corpus: str, *overrides: str) -> dict:
    from pipeline.run import run_job

    spec = tiny_spec(
        work,
        "job.kind=retrain",
        "job.name=nightly",
        "data.sources.0.kind=files",
        f"data.sources.0.path={corpus}",
        "data.min_chars=5",
        "tracking.heatmap_tokens=0",
        "retrain.margin=0.01",
        "data.val_fraction=0.2",
        *overrides,
    )
    return run_job(spec)


def test_champion_challenger_rounds(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    work = tmp_path / "work"
    first = write_corpus(tmp_path / "a", n=60)
    r1 = retrain(work, first)
    assert r1["decision"] == "promoted" and r1["promotion"]["reason"] == "no champion yet"

    r2 = retrain(work, first)  # the same data: nothing to learn
    assert r2["decision"] == "skipped" and "data unchanged" in r2["reason"]

    more = write_corpus(tmp_path / "b", n=90)  # new data; warm start and longer training
    r3 = retrain(work, more, "training.steps=24")
    assert r3["decision"] == "promoted", r3["promotion"]
    assert r3["promotion"]["value"] < r3["promotion"]["champion_value"]

    again = write_corpus(tmp_path / "c", n=100)  # new data, but a challenger barely trained
    r4 = retrain(work, again, "retrain.warm_start=false", "training.steps=2",
                 "training.lr_schedule.warmup_steps=1", "training.optimizer.lr=1e-5")  # fmt: skip
    assert r4["decision"] == "not promoted", r4["promotion"]

    client = MlflowClient(tracking_uri(None, work))
    champion = client.get_model_version_by_alias("nightly", "champion")
    challenger = client.get_model_version_by_alias("nightly", "challenger")
    assert str(champion.version) == r3["promotion"]["version"]
    assert str(challenger.version) == r4["promotion"]["version"]
    tags = client.get_model_version("nightly", r4["promotion"]["version"]).tags
    assert tags["attnpipe.decision"] == "not promoted"
    assert tags["attnpipe.compared_with_version"] == r3["promotion"]["version"]
    assert "attnpipe.compared_with.val_loss" in tags and "attnpipe.eval.val_loss" in tags


def test_compare_job_trains_variants_and_crowns_the_best(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.run import run_job

    corpus = write_corpus(tmp_path / "corpus", n=60)
    spec = tiny_spec(
        tmp_path / "work",
        "job.kind=compare",
        "job.name=cmp",
        "data.sources.0.kind=files",
        f"data.sources.0.path={corpus}",
        "data.min_chars=5",
        "data.val_fraction=0.2",
        "data.seq_len=64",
        "training.steps=6",
        "training.checkpoint_interval=6",
        "training.lr_schedule.warmup_steps=1",
        "tracking.heatmap_tokens=0",
        "compare.variants={dense: {attention: {pattern: dense, backend: sdpa}}, "
        "window: {attention: {pattern: longformer, params: {window: 4, global_tokens: [0]}, "
        "backend: blocksparse, block_size: 16}}}",
        # the probe's plumbing only (tests/test_probe.py shows what it measures)
        "compare.probe.seq_len=32",
        "compare.probe.distances=[3, 20]",
        "compare.probe.key_tokens=2",
        "compare.probe.d_model=16",
        "compare.probe.steps=3",
        "compare.probe.variants=[window]",  # dense is left out, as at 8K tokens
    )
    result = run_job(spec)
    rows = result["rows"]
    assert [r["val_loss"] for r in rows] == sorted(r["val_loss"] for r in rows)
    assert sorted(r["variant"] for r in rows) == ["dense", "window"]
    assert [r["decision"] for r in rows] == ["champion", "challenger"]
    flops = {r["variant"]: r["attention_gflops_per_token"] for r in rows}
    assert flops["window"] < flops["dense"]  # the window computes fewer attention tiles
    client = MlflowClient(tracking_uri(None, tmp_path / "work"))
    best = client.get_model_version_by_alias("cmp", "champion")
    assert str(best.version) == rows[0]["model_version"]
    logged = {a.path for a in client.list_artifacts(result["parent_run_id"])}
    assert {"comparison.json", "comparison.png", "probe.json"} <= logged
    probes = {p["variant"]: p for p in result["probe"]}
    assert list(probes) == ["window", "window (window only)"]
    assert probes["window (window only)"]["pattern"] == "sliding_window"
    assert probes["window (window only)"]["reach"] == 2 * 3  # 2 layers x (window - 1)
    parent = client.get_run(result["parent_run_id"])
    stages = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert parent.info.run_name == "cmp"  # the job; under it, its stages by name
    assert sorted(r.info.run_name for r in stages) == [
        "cmp-dense-train",
        "cmp-preprocess",
        "cmp-window-train",
    ]
    for run in (parent, *stages):
        assert run.data.tags["mlflow.source.name"] == "attnpipe"
        assert "mlflow.source.git.commit" in run.data.tags
    trained = [r for r in stages if r.data.tags["attnpipe.stage"] == "train"]
    assert all(r.data.params["training.steps"] == "6" for r in trained)
    metrics = parent.data.metrics
    for name in ("window", "window-window-only"):
        for distance in (3, 20):
            assert 0.0 <= metrics[f"probe/{name}/accuracy_d{distance}"] <= 1.0
    assert not any(key.startswith("probe/dense/") for key in metrics)
    accuracy = {r["variant"]: r.get("probe_accuracy") for r in rows}
    assert accuracy["dense"] is None and set(accuracy["window"]) == {3, 20}
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "comparison.json",
                                                      str(tmp_path))).read_text())  # fmt: skip
    assert "probe_accuracy" in table["columns"]  # whichever variant comes first
