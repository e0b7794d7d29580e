"""MetricBuffer: outages of a real tracking server, overflow, refusals, close deadlines.

The server tests start `mlflow server` on a free loopback port and stop it by its
process group. Fakes only simulate faults (an outage, a request that hangs).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow_server import MlflowServer, free_port, wait_for

from pipeline.tracking import buffer
from pipeline.tracking.buffer import DROPPED_METRIC, INCOMPLETE_TAG, MetricBuffer

KEYS = ("train/loss", "train/lr", "train/tokens_per_s")


def value(key: int, step: int) -> float:
    return step / 8 + key  # dyadic: survives JSON and SQLite exactly


def log_steps(buf: MetricBuffer, steps: range) -> None:
    for step in steps:
        buf.log_metrics({k: value(i, step) for i, k in enumerate(KEYS)}, step=step)


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def assert_all_points(client: MlflowClient, run_id: str, steps: range) -> None:
    """Every (key, step, value) logged is in the run, exactly once."""
    for i, key in enumerate(KEYS):
        assert history(client, run_id, key) == [(s, value(i, s)) for s in steps], key


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MlflowServer]:
    srv = MlflowServer(tmp_path)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def new_run(uri: str) -> tuple[MlflowClient, str]:
    client = MlflowClient(uri)
    experiment = client.create_experiment("buffer")
    return client, client.create_run(experiment).info.run_id


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One store for the module (creating its tables takes seconds), one run per test."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("buffer")
    return uri


@pytest.fixture
def sqlite_run(sqlite_uri: str) -> tuple[str, MlflowClient, str]:
    client = MlflowClient(sqlite_uri)
    experiment = client.get_experiment_by_name("buffer")
    assert experiment is not None
    return sqlite_uri, client, client.create_run(experiment.experiment_id).info.run_id


def test_server_outage_loses_nothing(
    server: MlflowServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=buffer.__name__)
    client, run_id = new_run(server.uri)
    buf = MetricBuffer(server.uri, run_id, flush_interval=0.1)

    log_steps(buf, range(100))
    wait_for(lambda: buf.delivered == 300, "the first 100 steps to arrive")

    server.stop()
    log_steps(buf, range(100, 200))  # the caller goes on while the server is down
    wait_for(lambda: "unreachable" in caplog.text, "the buffer to meet the outage")
    assert buf.delivered == 300  # nothing logged during the outage arrived...
    assert not server.healthy()  # ...and the logging loop finished before it ended
    outage_over_ms = time.time() * 1000

    server.start()
    counts = buf.close(timeout=60)

    assert counts == {"delivered": 600, "dropped": 0, "undelivered": 0}
    assert "reachable again" in caplog.text
    assert_all_points(client, run_id, range(200))
    late = [m for m in client.get_metric_history(run_id, KEYS[0]) if m.step >= 100]
    assert all(m.timestamp < outage_over_ms for m in late)  # stamped when logged
    assert client.get_metric_history(run_id, DROPPED_METRIC) == []


def test_sqlite_delivers_everything_in_batches(sqlite_run: tuple[str, MlflowClient, str]) -> None:
    uri, client, run_id = sqlite_run
    with MetricBuffer(uri, run_id, max_batch=250, flush_interval=0.05) as buf:
        log_steps(buf, range(500))  # 1,500 points: several batches
    assert buf.close() == {"delivered": 1500, "dropped": 0, "undelivered": 0}
    assert_all_points(client, run_id, range(500))
    assert INCOMPLETE_TAG not in client.get_run(run_id).data.tags


class Outage:
    """Wraps the real sender of the next MetricBuffer: every send fails while `down`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.down = True
        real = buffer._sender_for

        def sender_for(uri: str, run_id: str) -> buffer.Sender:
            send = real(uri, run_id)

            def flaky(metrics: list[Metric], tags: list[RunTag], timeout: float) -> None:
                if self.down:
                    raise ConnectionRefusedError("simulated outage")
                send(metrics, tags, timeout)

            return flaky

        monkeypatch.setattr(buffer, "_sender_for", sender_for)


def test_overflow_drops_the_oldest_and_says_so(
    sqlite_run: tuple[str, MlflowClient, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, client, run_id = sqlite_run
    outage = Outage(monkeypatch)
    buf = MetricBuffer(uri, run_id, capacity=50, flush_interval=0.05)
    for step in range(200):
        buf.log_metrics({"loss": value(0, step)}, step=step)
    assert buf.dropped == 150

    outage.down = False
    assert buf.close(timeout=30) == {"delivered": 50, "dropped": 150, "undelivered": 0}
    assert history(client, run_id, "loss") == [(s, value(0, s)) for s in range(150, 200)]
    assert [m.value for m in client.get_metric_history(run_id, DROPPED_METRIC)] == [150.0]
    assert "150" in client.get_run(run_id).data.tags[INCOMPLETE_TAG]


def test_eviction_during_a_request_counts_what_arrived(monkeypatch: pytest.MonkeyPatch) -> None:
    """Points evicted while their batch is in flight count as delivered if it arrives."""
    sent: list[Metric] = []
    in_flight, release = threading.Event(), threading.Event()

    def slow(metrics: list[Metric], tags: list[RunTag], timeout: float) -> None:
        in_flight.set()
        release.wait(30)  # a server that takes its time
        sent.extend(metrics)

    monkeypatch.setattr(buffer, "_sender_for", lambda uri, run_id: slow)
    buf = MetricBuffer("sqlite:///unused.db", "run", capacity=10, max_batch=4, flush_interval=60)
    for step in range(10):
        buf.log_metrics({"loss": step}, step=step)
    assert in_flight.wait(30)  # steps 0-3 are in flight
    for step in range(10, 20):
        buf.log_metrics({"loss": step}, step=step)
    assert buf.dropped == 10  # steps 0-9 evicted, 0-3 not yet known to have arrived
    release.set()

    assert buf.close(timeout=30) == {"delivered": 14, "dropped": 6, "undelivered": 0}
    points, report = sent[:-1], sent[-1]
    assert [m.step for m in points] == [0, 1, 2, 3, *range(10, 20)]
    assert (report.key, report.value) == (DROPPED_METRIC, 6.0)


def test_close_keeps_its_deadline_when_the_server_is_unreachable() -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nobody listens
    buf = MetricBuffer(uri, "0" * 32, flush_interval=0.05)
    log_steps(buf, range(10))
    start = time.monotonic()
    counts = buf.close(timeout=1.0)
    assert time.monotonic() - start < 3.0  # a hang check, not a speed claim
    assert counts == {"delivered": 0, "dropped": 0, "undelivered": 30}
    assert buf.close() is counts
    with pytest.raises(RuntimeError, match="after close"):
        buf.log_metrics({"loss": 1.0}, step=10)


def test_refused_points_are_dropped_not_retried_forever(
    sqlite_run: tuple[str, MlflowClient, str],
) -> None:
    uri, client, run_id = sqlite_run
    client.delete_run(run_id)  # the store refuses metrics for a deleted run
    buf = MetricBuffer(uri, run_id, flush_interval=0.05)
    log_steps(buf, range(5))
    assert buf.close(timeout=30) == {"delivered": 0, "dropped": 15, "undelivered": 0}


def test_a_bad_metric_name_fails_at_the_call(sqlite_run: tuple[str, MlflowClient, str]) -> None:
    uri, _, run_id = sqlite_run
    buf = MetricBuffer(uri, run_id)
    with pytest.raises(MlflowException, match="bad key!"):
        buf.log_metrics({"bad key!": 1.0}, step=0)
    with pytest.raises(ValueError):
        buf.log_metrics({"loss": "high"}, step=0)  # type: ignore[dict-item]
    assert buf.close() == {"delivered": 0, "dropped": 0, "undelivered": 0}
