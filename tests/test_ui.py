"""`attnpipe ui`: serves a work directory's MLflow store on 127.0.0.1 and stops with it."""

from __future__ import annotations

import os
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


def test_printed_links_open_the_run_and_heatmap_cards_show_their_images(
    tmp_path, monkeypatch, capsys
):
    """A run logged as the training driver logs one (its experiment, name, params, spec,
    metrics and heatmaps), on a real `mlflow server`, in headless Chromium: the links
    attnpipe prints open the run and the experiment's runs in the UI's model-training view
    (MLflow 3.17 opens an experiment as a GenAI app, "Overview" with its traces, otherwise),
    and an attention heatmap's card on the Model metrics tab shows the image as the tab first
    opens: MLflow's card prints the run's params above it, and its default step is 0."""
    import mlflow
    import torch
    from browser import chromium, heatmap_card, open_link
    from mlflow.tracking import MlflowClient
    from mlflow_server import MlflowServer

    from models.heatmap import render_heatmap
    from pipeline.config import load_spec
    from pipeline.tracking import (
        EXPERIMENT_KIND_TAG,
        TRAINING_EXPERIMENT,
        log_spec,
        stage_run_name,
        ui_url,
        use_experiment,
    )
    from pipeline.train.driver import log_heatmaps

    for name in ("MLFLOW_RUN_CONTEXT", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"):
        monkeypatch.delenv(name, raising=False)  # use_experiment sets them for the process
    spec = load_spec(ROOT / "jobs" / "decoder-tiny.yaml", [f"storage.work_dir={tmp_path}"])
    run_dir = tmp_path / "runs" / "decoder-tiny-1"
    tokens = [f"tok{i}" for i in range(16)]
    scores = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
    causal = torch.softmax(scores.masked_fill(torch.ones(16, 16).triu(1).bool(), -1e9), -1)
    for step in (0, 50):  # before training (the step a card opens at) and at an evaluation
        for layer, head in ((0, 0), (1, 1)):
            png = run_dir / "heatmaps" / f"step-{step:08d}" / f"decoder-layer{layer}-head{head}.png"
            render_heatmap(causal, png, tokens, tokens, title=f"decoder layer {layer}, head {head}")
    out = Path(os.environ.get("ATTNPIPE_SCREENSHOTS", tmp_path / "screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    with MlflowServer(tmp_path / "server") as server:
        experiment_id = use_experiment(server.uri, spec.tracking.experiment, tmp_path)
        experiment = MlflowClient(server.uri).get_experiment(experiment_id)
        assert experiment.tags[EXPERIMENT_KIND_TAG] == TRAINING_EXPERIMENT
        name = stage_run_name(spec.job.name, "train")
        with mlflow.start_run(run_name=name) as run:
            log_spec(spec)
            for step in (10, 50):
                mlflow.log_metric("train/loss", 5.0 - step / 100, step=step)
            assert log_heatmaps(run_dir) == 4
        assert "View run" not in capsys.readouterr().out  # MLflow's link, into its GenAI view
        run_url = ui_url(server.uri, experiment_id, run.info.run_id)
        runs_url = ui_url(server.uri, experiment_id)
        assert run_url and runs_url
        with chromium(tmp_path / "profile") as driver:
            run_page = open_link(driver, run_url, name, "train/loss", "4.5")
            runs_page = open_link(driver, runs_url, name)
            card = heatmap_card(driver, run_url, "attention/decoder-layer0-head0")
            driver.save_screenshot(str(out / "mlflow-heatmap-card.png"))
    for page in (run_page, runs_page):  # the model-training view, not a GenAI app's
        assert "Model registry" in page and "Observability" not in page, page[:1000]
    assert "attention.pattern=dense" in card["text"]  # the run's params: a few, short
    assert "job.description" not in card["text"] and "data.sources" not in card["text"]
    assert card.get("natural_width", 0) >= 200, card  # decoded: the card's 256-px image
    assert card["width"] >= 200, card  # larger than a thumbnail
    # In view without scrolling the card: a part larger than a thumbnail (MLflow's card is
    # 360 px high and centres the image in a square as wide as the card: at 1600 x 1000, the
    # top 108 of its 256 px rows show under 3 lines of params; under the whole spec, none)
    assert card["visible_width"] >= 200 and card["visible_height"] >= 96, card
    assert card["on_top"], card  # nothing covers it
