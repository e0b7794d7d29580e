"""Champion/challenger promotion with MLflow registry aliases, on a local SQLite store."""

from __future__ import annotations

import pytest

from pipeline.tracking.registry import CHALLENGER, CHAMPION, champion, decide, promote


def test_decide_needs_a_gain_beyond_the_margin():
    assert decide(10.0, None, 0.05) == (True, "no champion yet")
    assert decide(9.0, 10.0, 0.05)[0] is True  # 10% better, 5% needed
    assert decide(9.8, 10.0, 0.05)[0] is False  # 2% better: not enough
    assert decide(10.5, 10.0, 0.0)[0] is False  # worse
    assert decide(0.9, 0.8, 0.05, lower_is_better=False)[0] is True  # accuracy: higher wins


@pytest.fixture
def client(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    client.create_registered_model("lm")
    exp = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    for _ in range(3):
        run = client.create_run(exp)
        client.create_model_version("lm", f"runs:/{run.info.run_id}/model", run.info.run_id)
    return client


def test_first_version_becomes_champion_then_only_a_better_one_replaces_it(client):
    first = promote(client, "lm", "1", "val_loss", 3.0, None, margin=0.01)
    assert first.promoted and str(champion(client, "lm").version) == "1"
    worse = promote(client, "lm", "2", "val_loss", 3.1, 3.0, margin=0.01)
    assert not worse.promoted and str(champion(client, "lm").version) == "1"
    assert str(client.get_model_version_by_alias("lm", CHALLENGER).version) == "2"
    better = promote(client, "lm", "3", "val_loss", 2.5, 3.0, margin=0.01)
    assert better.promoted and better.champion_version == "1"
    assert str(client.get_model_version_by_alias("lm", CHAMPION).version) == "3"
    tags = client.get_model_version("lm", "3").tags
    assert tags["attnpipe.decision"] == "promoted"
    assert tags["attnpipe.compared_with_version"] == "1"
    assert tags["attnpipe.compared_with.val_loss"] == "3"
    assert client.get_model_version("lm", "2").tags["attnpipe.decision"] == "not promoted"
    assert client.get_model_version("lm", "1").tags["attnpipe.replaced_by"] == "3"
