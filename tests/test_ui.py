"""`attnpipe ui`: serves a work directory's MLflow store on 127.0.0.1 and stops with it."""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from mlflow_server import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
ATTNPIPE = str(Path(sys.executable).parent / "attnpipe")


def up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as reply:
            return reply.status == 200
    except OSError:
        return False


def test_ui_serves_the_local_store_and_stops_cleanly(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import tracking_uri, use_experiment

    work = tmp_path / "work"
    use_experiment(tracking_uri(None, work), "ui-check", work)
    client = MlflowClient(tracking_uri(None, work))
    run = client.create_run(client.get_experiment_by_name("ui-check").experiment_id)
    client.log_metric(run.info.run_id, "train/loss", 1.5, step=3)

    port = free_port()
    proc = subprocess.Popen(
        [ATTNPIPE, "ui", "--work-dir", str(work), "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        wait_for(lambda: up(f"http://127.0.0.1:{port}/health"), "the UI", timeout=120)
        query = f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get?run_id={run.info.run_id}"
        with urllib.request.urlopen(query, timeout=10) as reply:
            assert b"train/loss" in reply.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert f"MLflow UI: http://127.0.0.1:{port}" in err
    assert not up(f"http://127.0.0.1:{port}/health")  # the server went down with it


def test_ui_without_a_store_is_one_line(tmp_path):
    result = subprocess.run(
        [ATTNPIPE, "ui", "--work-dir", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no MLflow store" in result.stderr
