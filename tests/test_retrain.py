"""`kind: retrain` against an embedded Ray and a local MLflow registry: the first model
becomes champion, unchanged data is skipped, a better challenger is promoted and a worse
one is not."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest
from corpus import write_corpus
from mlflow_server import free_port, wait_for
from test_train import tiny_spec

from pipeline.data.shards import read_manifest
from pipeline.errors import UserError
from pipeline.kinds.evaluate import logged_model_id
from pipeline.tracking import tracking_uri

ATTNPIPE = str(Path(sys.executable).parent / "attnpipe")


@pytest.fixture(scope="module")
def ray_cluster():
    from pipeline.runtime import start_local_ray, stop_local_ray

    start_local_ray(2)
    yield
    stop_local_ray()


def on_corpus(work: Path, corpus: str, kind: str, name: str, *overrides: str) -> dict:
    """A `kind` job named `name` on the text files of `corpus`, run here."""
    from pipeline.run import run_job

    spec = tiny_spec(
        work,
        f"job.kind={kind}",
        f"job.name={name}",
        "data.sources.0.kind=files",
        f"data.sources.0.path={corpus}",
        "data.min_chars=5",
        "data.val_fraction=0.2",
        "tracking.heatmap_tokens=0",
        *overrides,
    )
    return run_job(spec)


def retrain(work: Path, corpus: str, *overrides: str) -> dict:
    return on_corpus(work, corpus, "retrain", "nightly", "retrain.margin=0.01", *overrides)


def evaluate(work: Path, corpus: str, *overrides: str) -> dict:
    models = "evaluate.models=[models:/nightly@champion, models:/nightly@challenger]"
    return on_corpus(work, corpus, "evaluate", "nightly-eval", models, *overrides)


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

    # kind: evaluate on both versions. Each trained its own tokenizer on its own corpus, so
    # each scores the data node preprocessed with its own; bits per byte compares them.
    probe = ["evaluate.probe.seq_len=32", "evaluate.probe.distances=[4,20]",
             "evaluate.probe.steps=2", "evaluate.probe.d_model=16"]  # fmt: skip
    evaluated = evaluate(work, again, "evaluate.batches=null", "evaluate.samples=2", *probe)
    rows = {row["model"]: row for row in evaluated["results"]}
    # the probe on each model's own attention, a row each (dense: no window of its own)
    assert [p["variant"] for p in evaluated["probe"]] == ["champion", "challenger"]
    assert all(sorted(p["accuracy"]) == [4, 20] for p in evaluated["probe"])
    logged = {a.path for a in client.list_artifacts(evaluated["mlflow_run_id"])}
    assert "probe.json" in logged
    assert sorted(rows) == ["challenger", "champion"]
    assert rows["champion"]["version"] == r3["promotion"]["version"]
    for row in rows.values():
        version = client.get_model_version("nightly", row["version"])
        data = work / "data" / "nightly-eval" / f"tokenizer-{tokenizer_digest(version)[:16]}"
        manifest = read_manifest(data)
        split = manifest["splits"]["val"]
        assert row["samples"] == split["samples"]  # the whole split: the exact counts
        ln2 = 0.6931471805599453
        want = row["loss"] / ln2 * split["predicted_tokens"] / split["bytes"]
        assert row["bits_per_byte"] == pytest.approx(want, rel=1e-12)
        fp = manifest["fingerprint"][:12]
        assert float(version.tags[f"attnpipe.eval.{fp}.val.bits_per_byte"]) == pytest.approx(
            row["bits_per_byte"], rel=1e-5
        )
        linked = {m.key: m for m in client.get_logged_model(logged_model_id(version)).metrics}
        assert linked["val/bits_per_byte"].value == pytest.approx(row["bits_per_byte"])
        assert linked["val/bits_per_byte"].dataset_digest == manifest["fingerprint"][:36]
    # the challenger barely trained: its loss per byte is the worse one
    assert rows["champion"]["bits_per_byte"] < rows["challenger"]["bits_per_byte"]
    assert [s["model"] for s in evaluated["samples"]] == ["champion"] * 2 + ["challenger"] * 2
    assert all(s["prompt"] and s["continuation"] for s in evaluated["samples"])
    # the retrain challenge scored the champion with the same function, on its own data
    first = client.get_run(r3["parent_run_id"]).data.metrics
    assert first["challenger/val_bits_per_byte"] > 0

    # `attnpipe generate` streams what a real `mlflow models serve` of the version answers
    uri = tracking_uri(None, work)
    prompt = evaluated["samples"][0]["prompt"]
    cli = subprocess.run(
        [ATTNPIPE, "generate", "models:/nightly@champion", prompt, "--max-new-tokens", "8",
         "--tracking-uri", uri],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert cli.returncode == 0 and cli.stdout.endswith("\n"), cli.stderr[-2000:]
    with served("models:/nightly@champion", uri) as url:
        body = json.dumps({"inputs": [prompt], "params": {"max_new_tokens": 8}}).encode()
        request = urllib.request.Request(
            f"{url}/invocations", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as answer:
            predictions = json.loads(answer.read())["predictions"]
    assert predictions == [cli.stdout[:-1]] and predictions[0]

    # data tokenized by another tokenizer than the model's is one line, not a score
    first_version = client.get_model_version("nightly", "1")  # trained on another corpus
    assert tokenizer_digest(first_version) != tokenizer_digest(challenger)
    other = work / "data" / "nightly-eval" / f"tokenizer-{tokenizer_digest(challenger)[:16]}"
    with pytest.raises(UserError, match=r"evaluate.data: .* was tokenized with tokenizer"):
        evaluate(work, again, f"evaluate.data={other}", "evaluate.models=[models:/nightly/1]")


@contextlib.contextmanager
def served(model_uri: str, uri: str):
    """`mlflow models serve` of a registered model on a free loopback port, in this
    environment; stopped by its process group."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri,
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            # as from a shell with the environment activated: MLflow runs `uvicorn` by name
            env={**os.environ, "MLFLOW_TRACKING_URI": uri,
                 "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

        def up() -> bool:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(log.read().decode(errors="replace")[-3000:])
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        try:
            wait_for(up, "mlflow models serve", timeout=180)
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def tokenizer_digest(version) -> str:
    from mlflow.artifacts import download_artifacts

    from pipeline.data.tokenizer import load_tokenizer, tokenizer_hash

    folder = Path(download_artifacts(f"models:/{version.name}/{version.version}"))
    return tokenizer_hash(load_tokenizer(next(folder.rglob("tokenizer.json"))))


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
    val = read_manifest(tmp_path / "work" / "data" / "cmp")["splits"]["val"]
    for r in rows:  # the table's loss per UTF-8 byte of the split
        want = r["val_loss"] / 0.6931471805599453 * val["predicted_tokens"] / val["bytes"]
        assert r["val_bits_per_byte"] == pytest.approx(want, rel=1e-12)
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
