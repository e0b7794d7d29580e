"""Preprocessed data in object storage: preprocessing's workers read sources from s3:// or
gs:// and write shards there, and training reads them, against real server processes
(tests/object_stores.py: moto's S3-compatible server, a Google Cloud Storage emulator)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from corpus import write_corpus
from object_stores import gcs_server, s3_server

from pipeline.config import DataNode, SourceNode
from pipeline.data import remote
from pipeline.data.reader import ShardReader
from pipeline.errors import DataError

ROOT = Path(__file__).resolve().parent.parent
ATTNPIPE = str(Path(sys.executable).parent / "attnpipe")
BUCKET = "attnpipe-test"


@pytest.fixture(scope="module")
def s3_env():
    with s3_server(BUCKET) as env:
        yield env


@pytest.fixture(scope="module")
def gcs_env():
    with gcs_server(BUCKET) as env:
        yield env


@pytest.fixture
def s3(s3_env, monkeypatch, tmp_path):
    """The server's environment in this process, and a mirror cache of the test's own."""
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("ATTNPIPE_CACHE", str(tmp_path / "cache"))
    fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}")
    return fs


@pytest.fixture(params=["s3", "gs"])
def store(request, monkeypatch, tmp_path):
    """(scheme, filesystem) of each kind of object storage, as `s3` does for S3."""
    if request.param == "s3":
        return "s3", request.getfixturevalue("s3")
    for key, value in request.getfixturevalue("gcs_env").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("ATTNPIPE_CACHE", str(tmp_path / "cache"))
    return "gs", remote._filesystem(f"gs://{BUCKET}")[0]


@pytest.fixture(scope="module")
def ray_local(s3_env, gcs_env):
    """A local Ray whose workers read and write the buckets: each node's credentials and
    endpoints come from its own environment, as on a cluster."""
    import ray

    from pipeline.runtime import stop_local_ray

    with pytest.MonkeyPatch.context() as env:
        for key, value in {**s3_env, **gcs_env}.items():
            env.setenv(key, value)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    stop_local_ray()


def data_node(glob: str) -> DataNode:
    return DataNode(
        sources=[SourceNode(kind="files", path=glob)],
        seq_len=32,
        min_chars=5,
        samples_per_shard=16,
        val_fraction=0.1,
    )


def preprocess(node: DataNode, out: str | Path, messages: list[str] | None = None):
    from pipeline.data.preprocess import preprocess as run

    log = messages.append if messages is not None else lambda m: None
    return run(node, out, vocab_size=300, parallelism=2, progress=log)


def objects(fs, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix`, by its path below it."""
    infos = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True))
    out = {}
    for info in infos:
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                out[info.path.removeprefix(f"{BUCKET}/{prefix}/")] = f.read()
    return out


def shutil_rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def test_preprocess_to_a_bucket_gives_the_local_output_and_training_reads_it_back(
    store, ray_local, tmp_path
):
    scheme, fs = store
    node = data_node(write_corpus(tmp_path / "corpus"))
    local = preprocess(node, tmp_path / "local")
    uri = f"{scheme}://{BUCKET}/data/demo"
    messages: list[str] = []
    up = preprocess(node, uri, messages)
    assert not up["cache_hit"] and up["fingerprint"] == local["fingerprint"]
    assert any(m.startswith(f"wrote {uri}: ") for m in messages)
    # the workers uploaded the shards; this machine wrote none of them
    assert up["driver"]["nodes"] and not remote.mirror_dir(uri).exists()

    stored = objects(fs, "data/demo")
    folder = tmp_path / "local"
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted(stored) == files  # manifest, tokenizer and every shard; no staged object
    for name in files:
        if name != "manifest.json":
            assert stored[name] == (tmp_path / "local" / name).read_bytes(), name
    assert json.loads(stored["manifest.json"])["splits"] == local["splits"]

    # a second run is a cache hit read from the bucket, not from this machine's mirror
    shutil_rm(remote.mirror_dir(uri))
    assert preprocess(node, uri)["cache_hit"]

    # a machine that never saw the data: its mirror is made from the bucket, then reused
    mirror = remote.local_copy(uri)
    assert mirror == remote.mirror_dir(uri) and mirror.is_relative_to(tmp_path / "cache")
    a = ShardReader(mirror, seed=3).next_batch(4)
    b = ShardReader(tmp_path / "local", seed=3).next_batch(4)
    np.testing.assert_array_equal(a, b)
    before = {p: p.stat().st_mtime_ns for p in mirror.rglob("*.npy")}
    assert remote.local_copy(uri) == mirror
    assert {p: p.stat().st_mtime_ns for p in mirror.rglob("*.npy")} == before  # no download


def test_a_corrupt_remote_shard_is_named_and_never_read(s3, ray_local, tmp_path):
    node = data_node(write_corpus(tmp_path / "corpus", n=40))
    uri = f"s3://{BUCKET}/data/corrupt"
    manifest = preprocess(node, uri)
    shutil_rm(remote.mirror_dir(uri))
    shard = manifest["splits"]["train"]["shards"][0]["file"]
    with s3.open_output_stream(f"{BUCKET}/data/corrupt/{shard}") as f:
        f.write(b"not a shard")
    with pytest.raises(DataError, match=f"{uri}/{shard}: shard is corrupt or truncated"):
        remote.local_copy(uri)
    assert not (remote.mirror_dir(uri) / shard).exists()
    assert not (remote.mirror_dir(uri) / "manifest.json").exists()


def test_a_failed_run_leaves_the_old_output_and_a_publish_cut_short_leaves_no_manifest(
    s3, ray_local, tmp_path, monkeypatch
):
    first = data_node(write_corpus(tmp_path / "a", n=60))
    uri = f"s3://{BUCKET}/data/cut"
    old = preprocess(first, uri)
    before = objects(s3, "data/cut")

    # bad input found by a worker: the old output stands as it was, nothing staged is left
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a first document"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: cannot read as json: line at byte 29"):
        preprocess(data_node(str(bad)), uri)
    assert objects(s3, "data/cut") == before

    # the connection drops while the driver publishes, after the old manifest went
    second = data_node(write_corpus(tmp_path / "b", n=200))  # more documents, more shards
    opened = remote._filesystem
    copies: list[str] = []

    class Dropping:
        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def copy_file(self, src, dst):
            copies.append(dst)
            if len(copies) == 3:
                raise OSError("connection reset by peer")
            self.fs.copy_file(src, dst)

    def dropping(uri):
        fs, path = opened(uri)
        return Dropping(fs), path

    monkeypatch.setattr(remote, "_filesystem", dropping)
    with pytest.raises(DataError, match=f"{uri}: cannot publish: connection reset by peer"):
        preprocess(second, uri)
    # no reader takes a mix of the two runs for an output
    assert "manifest.json" not in objects(s3, "data/cut")
    with pytest.raises(DataError, match="no manifest"):
        remote.local_copy(uri)

    monkeypatch.setattr(remote, "_filesystem", opened)
    new = preprocess(second, uri)  # redone whole
    stored = objects(s3, "data/cut")
    listed = {e["file"] for s in new["splits"].values() for e in s["shards"]}
    assert set(stored) == listed | {"manifest.json", "tokenizer.json"}  # nothing stale
    assert len(listed) > sum(len(s["shards"]) for s in old["splits"].values())
    assert json.loads(stored["manifest.json"])["fingerprint"] == new["fingerprint"]


def test_a_source_in_the_bucket_gives_the_shards_of_the_same_files_read_locally(
    s3, ray_local, tmp_path
):
    folder = tmp_path / "corpus"
    glob = write_corpus(folder, n=50)
    for path in sorted(folder.iterdir()):
        with s3.open_output_stream(f"{BUCKET}/corpus/part/{path.name}") as f:
            f.write(path.read_bytes())
    with s3.open_output_stream(f"{BUCKET}/corpus/part/notes.md") as f:
        f.write(b"not matched by the glob")
    local = preprocess(data_node(glob), tmp_path / "local")
    read = preprocess(data_node(f"s3://{BUCKET}/corpus/**/*.txt"), tmp_path / "remote")

    def shards(manifest):
        return [(e["file"], e["sha256"]) for s in manifest["splits"].values() for e in s["shards"]]

    assert shards(read) == shards(local) and read["counts"] == local["counts"]
    # the workers read the objects: none of them came to this machine
    assert read["driver"]["input_bytes_out"] == 0
    assert not remote.mirror_dir(f"s3://{BUCKET}/corpus").exists()
    assert preprocess(data_node(f"s3://{BUCKET}/corpus/**/*.txt"), tmp_path / "remote")["cache_hit"]
    # an object written again is a new source: the cache misses
    with s3.open_output_stream(f"{BUCKET}/corpus/part/{sorted(folder.iterdir())[0].name}") as f:
        f.write(b"a changed document in the bucket")
    again = preprocess(data_node(f"s3://{BUCKET}/corpus/**/*.txt"), tmp_path / "remote")
    assert not again["cache_hit"] and again["fingerprint"] != read["fingerprint"]
    with pytest.raises(DataError, match=f"s3://{BUCKET}/corpus/none-\\*.txt: no such file"):
        preprocess(data_node(f"s3://{BUCKET}/corpus/none-*.txt"), tmp_path / "none")


def test_unreachable_or_unfit_uris_are_one_line(s3, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(DataError, match=r"^s3://attnpipe-test/x: cannot read the manifest: "):
        remote.read_remote_manifest("s3://attnpipe-test/x")
    for uri, reason in [
        ("ftp://host/data", "scheme 'ftp' is not supported"),
        ("s3:///data", "names no bucket"),
        ("s3://key:secret@bucket/data", "holds credentials"),
        ("s3://bucket/data?secret_key=abc", "holds credentials"),
        ("s3://bucket/../../etc", "has a '..' component"),
    ]:
        with pytest.raises(DataError, match=reason):
            remote.local_copy(uri)


def test_storage_data_uri_is_checked_with_the_spec(tmp_path):
    result = subprocess.run(
        [
            ATTNPIPE,
            "validate",
            "jobs/decoder-tiny.yaml",
            "storage.data=s3://AKIA:topsecret@bucket/data",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "storage.data" in lines[0] and "holds credentials" in lines[0]


def test_jobs_on_s3_data_preprocess_train_and_export_on_different_machines(s3, ray_local, tmp_path):
    """`storage.data` in the bucket: preprocessing uploads (here, in this process); a train
    job on a machine that holds nothing (a cache of its own) finds the data there, and its
    Ray Train workers read that machine's mirror; `attnpipe export` on a third machine
    fetches the tokenizer."""
    from pipeline.config import load_spec
    from pipeline.tracking import tracking_uri

    corpus = write_corpus(tmp_path / "corpus")
    spec = [
        f"storage.work_dir={tmp_path / 'work'}",
        f"storage.data=s3://{BUCKET}/jobs",
        "data.seq_len=32",
        "data.tokenizer.vocab_size=300",
        "data.sources.0.kind=files",
        f"data.sources.0.path={corpus}",
        "data.min_chars=5",
        "training.steps=2",
        "training.lr_schedule.warmup_steps=1",
        "training.checkpoint_interval=2",
        "training.eval_interval=2",
        "tracking.system_metrics=false",
    ]

    def attnpipe(*args: str, machine: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "ATTNPIPE_CACHE": str(tmp_path / machine)}
        return subprocess.run(
            [ATTNPIPE, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
        )

    uri = f"s3://{BUCKET}/jobs/decoder-tiny"
    data = load_spec(ROOT / "jobs" / "decoder-tiny.yaml", spec).data
    messages: list[str] = []
    preprocess(data, uri, messages)
    assert any(m.startswith(f"wrote {uri}: ") for m in messages)
    assert not (tmp_path / "work" / "data").exists()  # the data lives in the bucket

    run = attnpipe("run", "jobs/decoder-tiny.yaml", "job.kind=train", *spec, machine="b")
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"cache hit: {uri}" in run.stderr
    summary = json.loads(run.stdout)
    assert summary["metrics"]["step"] == 2
    mirror = tmp_path / "b" / "remote" / "s3" / BUCKET / "jobs" / "decoder-tiny"
    stored = objects(s3, "jobs/decoder-tiny")
    assert (mirror / "manifest.json").read_bytes() == stored["manifest.json"]
    import mlflow

    store = tracking_uri(None, tmp_path / "work")
    mlflow.set_tracking_uri(store)
    train_run = mlflow.get_run(summary["mlflow_run_id"])
    sources = [json.loads(d.dataset.source) for d in train_run.inputs.dataset_inputs]
    assert [s.get("uri") for s in sources] == [uri]

    out = tmp_path / "exported"
    export = attnpipe(
        "export", summary["mlflow_run_id"], "--out", str(out), "--tracking-uri", store, machine="c"
    )
    assert export.returncode == 0, export.stderr[-2000:]
    assert (out / "tokenizer.json").read_bytes() == stored["tokenizer.json"]
