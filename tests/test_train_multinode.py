"""Training across nodes: a local multi-node Ray cluster (two nodes of one CPU each, as
ray.cluster_utils builds them), with the two workers placed on different nodes."""

from __future__ import annotations

import pytest
from corpus import write_corpus
from test_train import data_overrides, tiny_spec


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.runtime import free_port

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port(),
        },
    )
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_workers_spread_over_two_nodes_train_together(two_nodes, tmp_path):
    import ray

    from pipeline.data.preprocess import preprocess
    from pipeline.tracking import tracking_uri
    from pipeline.train.driver import run_train

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    spec = tiny_spec(
        tmp_path,
        *data_overrides(write_corpus(tmp_path / "corpus")),
        "resources.placement=STRICT_SPREAD",
        "training.steps=8",
    )
    preprocess(spec.data, tmp_path / "shards", vocab_size=300, parallelism=1, progress=print)
    uri = tracking_uri(None, tmp_path)
    result = run_train(spec, tmp_path / "shards", uri, progress=print)
    nodes = {e["rank"]: e["node"] for e in result["events"] if e["event"] == "placement"}
    assert set(nodes) == {0, 1} and nodes[0] != nodes[1]  # one worker per node
    assert result["metrics"]["step"] == 8 and result["checkpoint"].endswith("checkpoint-00000008")
