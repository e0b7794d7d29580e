"""Preprocessing as a cluster runs it: workers write the shards, on another node than the
driver's, byte for byte as one node writes them at any parallelism, into a shared folder
or a bucket (whose sources they read themselves); a worker killed in either pass is
retried and the output is still the same."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from corpus import write_corpus

from pipeline.config import DataNode, SourceNode

BLOCK_BYTES = 3000  # the test corpus (about 60 KB) in some twenty blocks


@pytest.fixture()
def small_blocks(monkeypatch):
    import pipeline.data.preprocess as prep

    monkeypatch.setattr(prep, "BLOCK_BYTES", BLOCK_BYTES)


def preprocess(glob: str, out: Path | str, parallelism: int, per_shard: int = 4) -> dict:
    from pipeline.data.preprocess import preprocess

    node = DataNode(
        sources=[SourceNode(kind="files", path=glob, weight=1.5)],
        seq_len=32,
        min_chars=5,
        samples_per_shard=per_shard,
        val_fraction=0.1,
    )
    return preprocess(node, out, vocab_size=300, parallelism=parallelism, progress=lambda m: None)


def shards(manifest: dict) -> list[tuple[str, str]]:
    return [
        (s["file"], s["sha256"]) for split in manifest["splits"].values() for s in split["shards"]
    ]


@contextmanager
def two_nodes() -> Iterator[str]:
    """A cluster of two nodes on this machine, the driver's (no CPU) and a worker node,
    whose id it yields; both started with this process's environment."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        worker = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        assert ray.get_runtime_context().get_node_id() != worker.node_id
        yield worker.node_id
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_two_node_cluster_writes_on_the_worker_node_what_one_node_writes(tmp_path, small_blocks):
    import ray

    from pipeline.runtime import stop_local_ray

    glob = write_corpus(tmp_path / "corpus")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        alone = {p: preprocess(glob, tmp_path / f"one-{p}", p) for p in (1, 2)}
    finally:
        stop_local_ray()
    assert shards(alone[1]) == shards(alone[2])
    assert alone[1]["driver"]["blocks"] > 10

    with two_nodes() as worker:
        for p in (1, 2):
            spread = preprocess(glob, tmp_path / f"two-{p}", p)
            assert shards(spread) == shards(alone[1]), f"parallelism {p}"
            assert spread["driver"]["nodes"] == [worker]  # not the driver's node
            assert spread["splits"] == alone[1]["splits"]


def test_on_a_cluster_workers_read_a_bucket_and_upload_the_shards_one_node_writes(
    tmp_path, monkeypatch
):
    """Sources and output in a bucket (a real S3-compatible server): the worker node reads
    the objects and uploads the shards; the driver handles neither, and the shards are the
    ones a local run writes."""
    import pyarrow.fs as pafs
    from object_stores import s3_server

    import pipeline.data.preprocess as prep

    monkeypatch.setattr(prep, "BLOCK_BYTES", 20_000)  # a few blocks: each is uploaded apart

    glob = write_corpus(tmp_path / "corpus")
    with s3_server("attnpipe-cluster") as env:
        for key, value in env.items():
            monkeypatch.setenv(key, value)  # before the nodes start: they take it too
        monkeypatch.setenv("ATTNPIPE_CACHE", str(tmp_path / "cache"))
        fs, _ = pafs.FileSystem.from_uri("s3://attnpipe-cluster")
        for path in sorted((tmp_path / "corpus").iterdir()):
            with fs.open_output_stream(f"attnpipe-cluster/corpus/{path.name}") as f:
                f.write(path.read_bytes())
        with two_nodes() as worker:
            # a shard a request or three (upload, copy, delete) to a test server that
            # answers each in tens of milliseconds: fewer, larger shards
            local = preprocess(glob, tmp_path / "local", 2, per_shard=64)
            out = "s3://attnpipe-cluster/out"
            up = preprocess("s3://attnpipe-cluster/corpus/*.txt", out, 2, per_shard=64)
            stored = {
                i.path.removeprefix("attnpipe-cluster/out/")
                for i in fs.get_file_info(pafs.FileSelector("attnpipe-cluster/out", recursive=True))
                if i.type == pafs.FileType.File
            }
    assert shards(up) == shards(local) and up["splits"] == local["splits"]
    assert up["driver"]["nodes"] == [worker]
    assert up["driver"]["input_bytes_out"] == 0  # no input block went through the driver
    assert stored == {f for f, _ in shards(up)} | {"manifest.json", "tokenizer.json"}
    assert not (tmp_path / "cache").exists()  # this machine fetched nothing


@pytest.mark.parametrize("stage", ["encode", "write"])
def test_a_worker_killed_in_either_pass_is_retried_and_the_output_is_the_same(
    tmp_path, small_blocks, stage
):
    import ray

    from pipeline.data.blocks import FAULT
    from pipeline.runtime import stop_local_ray

    glob = write_corpus(tmp_path / "corpus", n=60)
    marker = tmp_path / "held"
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {FAULT: f"{stage}:3:{marker}"}},
    )
    try:
        result: dict = {}

        def faulted() -> None:
            try:
                result.update(preprocess(glob, tmp_path / "faulted", 2))
            except BaseException as exc:  # the main thread reports it
                result["error"] = exc

        run = threading.Thread(target=faulted)
        run.start()
        deadline = time.monotonic() + 120
        while not (marker.is_file() and marker.read_text().strip()):
            assert time.monotonic() < deadline and run.is_alive(), "block 3 was never held"
            time.sleep(0.05)
        os.kill(int(marker.read_text()), signal.SIGKILL)  # the worker holding block 3
        run.join(timeout=120)
        assert not run.is_alive(), "the run did not finish after the kill"
        assert "error" not in result, result.get("error")
        clean = preprocess(glob, tmp_path / "clean", 2)  # the marker exists: nothing held
    finally:
        stop_local_ray()
    assert shards(result) == shards(clean)
    assert result["counts"] == clean["counts"] and result["splits"] == clean["splits"]
