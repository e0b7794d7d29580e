"""Submitting and scheduling jobs, end to end against real processes on 127.0.0.1: a Ray
head started with `ray start` (its dashboard serves the Jobs API, token authentication on)
and an `mlflow server`, one of each for the module."""

from __future__ import annotations

import ipaddress
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from corpus import write_corpus
from mlflow_server import MlflowServer, free_port, wait_for
from ray_head import RayHead

ROOT = Path(__file__).resolve().parent.parent
ATTNPIPE = str(Path(sys.executable).parent / "attnpipe")


@pytest.fixture(scope="module")
def ray_head():
    head = RayHead(num_cpus=2)
    head.start()
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, mlflow_uri) -> list[str]:
    """Overrides that make jobs/decoder-tiny.yaml a few-second job on a small corpus."""
    work = tmp_path_factory.mktemp("work")
    glob = write_corpus(tmp_path_factory.mktemp("corpus"))
    return [
        f"storage.work_dir={work}",
        f"tracking.uri={mlflow_uri}",
        "tracking.system_metrics=false",
        "data.sources.0.kind=files",
        f"data.sources.0.path={glob}",
        "data.min_chars=5",
        "data.seq_len=32",
        "data.tokenizer.vocab_size=300",
        "training.steps=4",
        "training.lr_schedule.warmup_steps=1",
        "training.checkpoint_interval=2",
        "training.eval_interval=2",
        "training.log_interval=2",
    ]


def attnpipe(*args: str, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run(
        [ATTNPIPE, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout
    )


def one_error_line(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("attnpipe: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def fields(stdout: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in stdout.splitlines() if ": " in line)


def step_lines(output: str) -> list[str]:
    """The `step N/M ...` progress lines of a job's output, as Ray forwards them from rank 0
    (`(RayTrainWorker pid=...) step 2/4 train/loss=...`), from `step` on."""
    return re.findall(r"^.*?RayTrainWorker pid=\d+\).*?(step \d+/\d+ .*)$", output, re.M)


def assert_whole_progress_lines(output: str) -> None:
    """Each step logged once, every log_interval (2) steps and at the end; a progress line
    holding a path is one line (rich wrapped it at 80 columns in a job's log)."""
    steps = step_lines(output)
    assert [line.split()[1] for line in steps] == ["2/4", "4/4"], steps
    assert all("train/loss=" in line and "val/loss=" in line for line in steps), steps
    assert re.search(r"\] MLflow run \w+; checkpoints in /\S+/runs/decoder-tiny-\S+$", output, re.M)


@pytest.fixture
def cluster(ray_head, monkeypatch):
    """The Jobs API of the test cluster, from this process."""
    from pipeline.jobs.submit import Cluster

    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.setenv(key, ray_head.env()[key])
    return Cluster()


# --------------------------------------------------------------------------- submit


@pytest.fixture(scope="module")
def submitted(ray_head, tiny):
    """`attnpipe submit jobs/decoder-tiny.yaml --wait`: trained on the cluster."""
    result = attnpipe(
        "submit", "jobs/decoder-tiny.yaml", *tiny, "--wait", env=ray_head.env(), timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return fields(result.stdout), result


def test_submit_wait_trains_on_the_cluster_and_mlflow_holds_run_metrics_and_model(
    submitted, mlflow_uri
):
    from mlflow.tracking import MlflowClient

    out, result = submitted
    sid = out["submission_id"]
    assert sid.startswith("decoder-tiny-") and sid.endswith("Z") and out["status"] == "SUCCEEDED"
    assert_whole_progress_lines(result.stderr)  # the job's logs, followed
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("attnpipe-examples")
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.`attnpipe.ray_submission_id` = '{sid}'"
    )
    assert len(runs) == 1
    run = runs[0]
    page = f"#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
    assert out["mlflow"] == f"{mlflow_uri}/{page}?workflowType=machine_learning"
    # the commit of this checkout, taken at submit time (the job's folder has no .git)
    assert run.data.tags["mlflow.source.git.commit"] == git_head()
    assert run.data.tags["mlflow.source.name"] == "attnpipe"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses][-1] == 4
    assert "val/loss" in run.data.metrics
    versions = client.search_model_versions("name = 'decoder-tiny'")
    assert [v.run_id for v in versions] == [run.info.run_id]


def test_status_logs_and_list_against_the_cluster(submitted, ray_head, mlflow_uri):
    out, _ = submitted
    sid = out["submission_id"]
    status = attnpipe("status", sid, env=ray_head.env())
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith(f"{sid}: SUCCEEDED")
    assert f"mlflow:     {out['mlflow']}" in status.stdout
    logs = attnpipe("logs", sid, env=ray_head.env())
    assert logs.returncode == 0, logs.stderr
    assert_whole_progress_lines(logs.stdout)
    summary = json.loads(logs.stdout[logs.stdout.rindex("\n{") :].split("\n}")[0] + "\n}")
    assert summary["metrics"]["step"] == 4
    listed = attnpipe("list", env=ray_head.env())
    assert listed.returncode == 0
    row = next(line for line in listed.stdout.splitlines() if line.startswith(sid))
    assert row.split()[1] == "SUCCEEDED" and row.split()[-1] == "decoder-tiny"


def test_a_cluster_started_without_the_environment_on_its_path_runs_jobs_in_it(submitted, ray_head):
    """The module's cluster is `.venv/bin/ray start` from a shell that has not activated
    the environment: the `python` its PATH finds is not the environment's (here pyenv's,
    without attnpipe's dependencies, or none at all). The submitted job ran anyway, with the
    interpreter the cluster's Ray runs its workers with."""
    import psutil

    venv_python = Path(sys.executable)
    path = psutil.Process(ray_head.proc.pid).environ()["PATH"]
    found = shutil.which("python", path=path)
    assert found is None or not os.path.samefile(found, venv_python), path
    out, _ = submitted
    status = attnpipe("status", out["submission_id"], env=ray_head.env())
    assert status.returncode == 0, status.stderr
    entrypoint = fields(status.stdout)["  entrypoint"]
    assert entrypoint == f"{venv_python} -m pipeline.cli run attnpipe-spec.yaml"


def test_a_laptop_cluster_listens_on_loopback_only(submitted, ray_head):
    """As docs/operations.md starts one (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, node address
    127.0.0.1): no Ray process, the workers a job started included, listens beyond
    loopback."""
    listening = {ipaddress.ip_address(ip) for ip in ray_head.listening()}
    assert listening, "no listening sockets found"
    for ip in listening:
        mapped = getattr(ip, "ipv4_mapped", None)
        assert (mapped or ip).is_loopback, sorted(map(str, listening))


def test_stop_a_running_job_and_its_status_exits_3(submitted, ray_head, tiny, cluster):
    env = ray_head.env()
    result = attnpipe("submit", "jobs/decoder-tiny.yaml", *tiny, "training.steps=100000",
                      "job.name=long-run", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    sid = fields(result.stdout)["submission_id"]
    running = attnpipe("status", sid, env=env)
    assert running.returncode == 0, running.stderr  # PENDING or RUNNING
    stopped = attnpipe("stop", sid, env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.startswith(f"{sid}: stop requested")
    wait_for(lambda: cluster.info(sid).status.value == "STOPPED", "the job to stop", timeout=60)
    again = attnpipe("stop", sid, env=env)
    assert again.returncode == 0 and again.stdout.strip() == f"{sid}: not running (STOPPED)"
    status = attnpipe("status", sid, env=env)
    assert status.returncode == 3, status.stderr
    assert status.stdout.startswith(f"{sid}: STOPPED") and "Traceback" not in status.stderr


def lines_of(stream: Any) -> queue.Queue[str | None]:
    """A process's output lines as they come (None at its end)."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_a_worker_lost_beyond_max_failures_fails_attnpipe_run_submit_wait_and_status(
    submitted, ray_head, tiny
):
    """A training worker is killed (as a lost node or the OOM killer would) in a job that
    allows no worker failures: the job's `attnpipe run` exits 1 with one line, so the job
    FAILED; `submit --wait` and `status` exit 1."""
    import psutil

    env = ray_head.env()
    proc = subprocess.Popen(
        [ATTNPIPE, "submit", "jobs/decoder-tiny.yaml", *tiny, "job.name=doomed",
         "training.steps=100000", "training.log_interval=1", "training.max_failures=0",
         "--wait"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    try:
        lines, seen, found = lines_of(proc.stderr), [], None
        while found is None:  # rank 0's first step: its pid is in the line's prefix
            line = lines.get(timeout=300)
            assert line is not None, "".join(seen)[-3000:]
            seen.append(line)
            found = re.search(r"RayTrainWorker pid=(\d+)\).*step 1/", line)
        worker = psutil.Process(int(found.group(1)))
        assert worker in ray_head.processes(), worker  # a process of the test's cluster
        worker.kill()
        assert proc.wait(timeout=300) == 1
        while (line := lines.get(timeout=30)) is not None:
            seen.append(line)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr, out = "".join(seen), fields(proc.stdout.read())
    assert out["status"] == "FAILED", out
    sid = out["submission_id"]
    # the job's driver, `attnpipe run`: one line and exit code 1, which Ray reports
    failed = re.findall(r"^attnpipe: training failed .*$", stderr, re.M)
    assert len(failed) == 1, stderr[-3000:]
    assert failed[0].startswith("attnpipe: training failed (training.max_failures=0): rank 0: ")
    last = stderr.rstrip("\n").splitlines()[-1]
    assert last == f"attnpipe: job {sid} FAILED: Job entrypoint command failed with exit code 1"
    status = attnpipe("status", sid, env=env)
    assert status.returncode == 1, status.stderr
    assert status.stdout.startswith(f"{sid}: FAILED") and "Traceback" not in status.stderr


def test_attnpipe_run_starts_its_own_ray_in_a_shell_set_up_for_submit(tiny):
    """In the shell of the README's walk-through: RAY_ADDRESS is the Jobs API's URL (which
    `ray.init()` refuses), and `ray start` recorded its cluster in <Ray's temp
    dir>/ray_current_cluster, where a bare `ray.init()` joins it (and, given num_cpus,
    raises), a record that a cluster stopped by its pid leaves behind. `attnpipe run`
    starts its own embedded Ray all the same."""
    temp = Path(tempfile.mkdtemp(prefix="ar", dir="/tmp"))  # short: Ray's socket paths
    try:
        (temp / "ray").mkdir()
        (temp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDR")}
        env.update(RAY_TMPDIR=str(temp), RAY_ADDRESS=f"http://127.0.0.1:{free_port()}")
        run = attnpipe("run", "jobs/decoder-tiny.yaml", *tiny, "job.kind=preprocess", env=env,
                       timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        assert json.loads(run.stdout)["tokens"] > 0
    finally:
        shutil.rmtree(temp, ignore_errors=True)


# --------------------------------------------------------------------------- bad input


def test_unknown_submission_id_is_one_line(ray_head):
    for command in ("status", "stop"):
        result = attnpipe(command, "no-such-job", env=ray_head.env())
        one_error_line(result, "no job with submission id 'no-such-job'", ray_head.address)
    for command, sid in (("status", "?"), ("logs", "a/b")):  # not another endpoint of the API
        one_error_line(attnpipe(command, sid, env=ray_head.env()), f"submission id {sid!r}")


def test_a_spec_asking_for_more_gpus_than_the_cluster_has_is_one_line(ray_head, tiny, cluster):
    before = len(cluster.jobs())
    result = attnpipe(
        "submit", "jobs/decoder-tiny.yaml", *tiny, "resources.gpus_per_worker=1",
        env=ray_head.env(),
    )  # fmt: skip
    one_error_line(
        result, "resources.gpus_per_worker: 2 workers x 1 GPU = 2 GPUs requested", "has 0"
    )
    assert len(cluster.jobs()) == before  # nothing submitted


def test_a_cluster_with_token_auth_wants_the_token(ray_head):
    env = {k: v for k, v in ray_head.env().items() if k != "RAY_AUTH_TOKEN_PATH"}
    one_error_line(attnpipe("list", env=env), "requires an auth token", "RAY_AUTH_TOKEN")


def test_an_unreachable_address_is_one_line_from_the_probe_not_rays_retries(tmp_path):
    """A refused or silent address ends in attnpipe's own probe (3 s), whose one line says
    so, not in the retries of Ray's client (minutes); the machine's load decides the wall
    time, so the wording is what is checked."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    refused = attnpipe("list", "--address", f"http://127.0.0.1:{free_port()}", env=env)
    one_error_line(refused, "cannot reach the Ray dashboard", "ray start --head")
    with socket.socket() as silent:  # accepts connections and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        hung = attnpipe(
            "submit", "jobs/decoder-tiny.yaml", f"storage.work_dir={tmp_path}",
            "--address", f"127.0.0.1:{silent.getsockname()[1]}", env=env, timeout=60,
        )  # fmt: skip
        one_error_line(hung, "cannot reach the Ray dashboard", "timed out")
    missing = attnpipe("list", env=env)
    one_error_line(missing, "no Ray cluster address", "RAY_ADDRESS", "ray start --head")


def test_bad_specs_fail_before_the_cluster_is_contacted(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": f"http://127.0.0.1:{free_port()}"}  # nothing there
    cron = attnpipe(
        "schedule", "add", "jobs/decoder-tiny.yaml", "schedule.cron=61 * * * *",
        "--state-dir", str(tmp_path), env=env,
    )  # fmt: skip
    one_error_line(cron, "schedule.cron: invalid cron expression '61 * * * *'")
    kind = attnpipe("submit", "jobs/decoder-tiny.yaml", "job.kind=evaluate", env=env)
    one_error_line(kind, "evaluate.models: an evaluate job needs at least one model")


# --------------------------------------------------------------------------- schedules


def test_cron_weekdays_mean_what_they_mean_to_cron():
    from pipeline.config import cron_trigger

    monday = datetime(2026, 11, 23, tzinfo=timezone.utc)
    assert cron_trigger("0 3 * * 0").get_next_fire_time(None, monday).strftime("%a") == "Sun"
    weekdays = cron_trigger("0 3 * * 1-5")
    fires, at = [], monday
    for _ in range(6):
        at = weekdays.get_next_fire_time(None, at + timedelta(seconds=1))
        fires.append(at.strftime("%a"))
    assert fires == ["Mon", "Tue", "Wed", "Thu", "Fri", "Mon"]
    seconds = cron_trigger("*/20 * * * * *").get_next_fire_time(None, monday)
    assert seconds == monday  # six fields: seconds first


def scheduler(state: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [ATTNPIPE, "scheduler", "--state-dir", str(state), "--poll", "0.5"],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True,
        )  # fmt: skip


def firings(state: Path) -> list[dict[str, str]]:
    from pipeline.jobs.scheduler import Store

    return Store(state).firings()


def succeeded(cluster, sid: str) -> bool:
    status = str(cluster.info(sid).status.value)
    assert status in ("PENDING", "RUNNING", "SUCCEEDED"), cluster.logs(sid)[-3000:]
    return status == "SUCCEEDED"


def test_the_scheduler_fires_each_slot_once_across_a_restart(
    submitted, ray_head, tiny, tmp_path, cluster
):
    """A seconds-resolution schedule of a preprocessing job (a cache hit: the submitted job
    wrote those shards). The scheduler is killed after a slot and restarted once the next
    slot has passed: that slot is submitted, once; no slot ever twice."""
    from pipeline.jobs.scheduler import Store, fire_schedule

    env, state = ray_head.env(), tmp_path / "state"
    first = scheduler(state, env, tmp_path / "first.log")
    second = None
    try:
        # holding the lock and running on an empty state: a schedule added now is picked up
        wait_for(lambda: "scheduler running" in (tmp_path / "first.log").read_text(),
                 "the first scheduler to take the lock", timeout=60)  # fmt: skip
        assert (state / "scheduler.lock").read_text().strip() == str(first.pid)
        second = scheduler(state, env, tmp_path / "second.log")
        assert second.wait(timeout=60) == 2
        assert (
            f"another scheduler is already running on {state} (pid {first.pid})"
            in (tmp_path / "second.log").read_text()
        )
        added = attnpipe(
            "schedule", "add", "jobs/decoder-tiny.yaml", *tiny, "job.kind=preprocess",
            "schedule.cron=*/10 * * * * *", "--name", "nightly", "--state-dir", str(state),
            env=env,
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        wait_for(lambda: bool(firings(state)), "a first firing", timeout=60)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # a crash: the lock goes with the process
                proc.wait()
    (fired,) = firings(state)
    assert fired["outcome"] == "submitted", fired
    wait_for(lambda: succeeded(cluster, fired["submission_id"]), "the first job", timeout=180)
    due = datetime.strptime(fired["slot"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    while datetime.now(timezone.utc) < due + timedelta(seconds=11):  # the next slot passes
        time.sleep(0.5)

    def submitted_since() -> list[dict[str, str]]:
        return [f for f in firings(state)[1:] if f["outcome"] == "submitted"]

    restarted = scheduler(state, env, tmp_path / "restarted.log")
    try:
        # the missed slots, as one firing; a slot that comes while it is still being
        # submitted (a loaded machine) is skipped, and recorded first
        wait_for(lambda: bool(submitted_since()), "the missed slot", timeout=60)
        listed = attnpipe("schedule", "list", "--state-dir", str(state), env=env)
        assert listed.returncode == 0 and "*/10 * * * * *" in listed.stdout, listed.stderr
        saved = Store(state).get("nightly")
        removed = attnpipe("schedule", "remove", "nightly", "--state-dir", str(state), env=env)
        assert removed.returncode == 0, removed.stderr
        wait_for(lambda: "nightly: removed" in (state / "scheduler.log").read_text(),
                 "the running scheduler to drop the schedule", timeout=30)  # fmt: skip
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(timeout=60) == 0
    history = firings(state)
    after = submitted_since()[0]
    assert after["slot"] > fired["slot"], history
    assert {f["outcome"] for f in history[1:]} <= {"submitted", "skipped"}, history
    assert len({f["slot"] for f in history}) == len(history)  # no slot twice
    jobs = [j for j in cluster.jobs() if (j.metadata or {}).get("attnpipe.schedule") == "nightly"]
    submitted_ids = [f["submission_id"] for f in history if f["outcome"] == "submitted"]
    assert sorted(j.submission_id for j in jobs) == sorted(submitted_ids)

    # The first slot again (a scheduler that died between submitting and saving its next
    # slot): Ray holds that submission id, so nothing runs twice.
    Store(state).put(saved)
    assert fire_schedule(str(state), "nightly", saved.version, due) == "already submitted"
    assert [j.submission_id for j in cluster.jobs()].count(fired["submission_id"]) == 1

    # A slot whose previous run is still going is skipped, and the skip recorded.
    busy = cluster.client.submit_job(
        entrypoint="sleep 60", metadata={"attnpipe.schedule": "nightly"}
    )
    try:
        later = due + timedelta(hours=1)
        assert fire_schedule(str(state), "nightly", saved.version, later) == "skipped"
        assert firings(state)[-1]["detail"] == f"{busy} is still running"
        assert not cluster.exists(f"nightly-{later:%Y%m%dT%H%M%SZ}")
    finally:
        cluster.client.stop_job(busy)


def test_runtime_env_carries_the_project_or_names_an_image(tmp_path):
    """Without --image: the spec in a working dir, attnpipe's packages, --pip packages. With
    --image: no working dir (Ray allows none beside an image); the spec travels in an env
    var and reaches `attnpipe` through stdin unchanged."""
    from pipeline.config import load_spec, resolved_yaml
    from pipeline.errors import UserError
    from pipeline.jobs.submit import SPEC_FILE, runtime_env

    spec = load_spec(ROOT / "jobs" / "decoder-tiny.yaml", ["training.steps=70"])
    python = "/opt/ray env/bin/python3"  # the Python the cluster runs its workers with
    env, entry = runtime_env(spec, "sid-1", tmp_path, pip=["rich==14.0.0"], python=python)
    assert env["working_dir"] == str(tmp_path) and env["pip"] == ["rich==14.0.0"]
    assert {Path(m).name for m in env["py_modules"]} == {"pipeline", "models"}
    assert (tmp_path / SPEC_FILE).read_text() == resolved_yaml(spec)
    assert entry == f"python -m pipeline.cli run {SPEC_FILE}"  # --pip: Ray's virtualenv's
    # the submission id, and the commit of this checkout (the job's folder has no .git)
    assert env["env_vars"] == {"RAY_JOB_SUBMISSION_ID": "sid-1", "ATTNPIPE_GIT_COMMIT": git_head()}
    env, entry = runtime_env(spec, "sid-1", tmp_path, python=python)
    assert entry == f"'{python}' -m pipeline.cli run {SPEC_FILE}"
    assert env["env_vars"]["PATH"] == "/opt/ray env/bin:${PATH}"  # Ray expands it

    env, entry = runtime_env(spec, "sid-2", tmp_path / "unused", image="registry/attnpipe:1")
    assert env["image_uri"] == "registry/attnpipe:1" and "working_dir" not in env
    assert not (tmp_path / "unused").exists()
    # the entrypoint as the image's shell runs it, `run` swapped for `validate` (no training)
    command = entry.replace("pipeline.cli run", "pipeline.cli validate")
    shown = subprocess.run(
        ["bash", "-c", command.replace("python ", f"{sys.executable} ", 1)],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **env["env_vars"]},
        timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == resolved_yaml(spec)
    with pytest.raises(UserError, match="--pip"):
        runtime_env(spec, "sid-3", tmp_path, image="registry/attnpipe:1", pip=["x"])


def test_the_python_of_a_job_is_the_one_the_cluster_runs_its_workers_with(monkeypatch):
    """Read from each live raylet's --python_worker_command in the dashboard's node summary:
    the head node's (where a driver runs), or the one all nodes share; None when the
    dashboard does not say, or the nodes differ."""
    from pipeline.jobs import submit
    from pipeline.jobs.submit import Cluster

    def node(python: str, head: bool, state: str = "ALIVE") -> dict[str, Any]:
        command = f"--python_worker_command={python} /ray/setup_worker.py --flag=1"
        raylet = {"state": state, "isHeadNode": head}
        return {"raylet": raylet, "cmdline": ["/ray/raylet", "--x=1", command]}

    nodes: list[dict[str, Any]] = []
    ray = Cluster.__new__(Cluster)  # no cluster: the dashboard's reply is faked
    monkeypatch.setattr(ray, "_get", lambda path: {"data": {"summary": nodes}})
    monkeypatch.setattr(submit, "PYTHON_WAIT_S", 0.0)
    assert ray.worker_python() is None  # nothing reported yet
    nodes += [node("/w/bin/python", False), node("'/h env/bin/python'", True)]
    nodes.append(node("/old/bin/python", True, state="DEAD"))
    assert ray.worker_python() == "/h env/bin/python"
    assert ray.worker_python(anywhere=True) is None  # the driver may land on either
    nodes[0] = node("/h\\ env/bin/python", False)
    assert ray.worker_python(anywhere=True) == "/h env/bin/python"


def test_the_scheduler_keeps_its_state_in_a_per_user_folder_by_default(tmp_path):
    """Not in the folder a command runs in (a checkout): $XDG_STATE_HOME/attnpipe/scheduler,
    else ~/.local/state/attnpipe/scheduler, else --state-dir / $ATTNPIPE_SCHEDULER_DIR."""
    work, home = tmp_path / "checkout", tmp_path / "home"
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("XDG_STATE_HOME", "ATTNPIPE_SCHEDULER_DIR")}  # fmt: skip
    env["HOME"] = str(home)

    def schedule_list(**extra: str) -> None:
        listed = subprocess.run([ATTNPIPE, "schedule", "list"], capture_output=True,
                                text=True, cwd=work, env={**env, **extra}, timeout=60)  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.split() == ["NAME", "CRON", "TIMEZONE", "NEXT", "SLOT", "(UTC)",
                                         "LAST", "FIRING"]  # fmt: skip

    schedule_list()
    assert (home / ".local/state/attnpipe/scheduler/schedules.db").exists()
    schedule_list(XDG_STATE_HOME=str(tmp_path / "xdg"))
    assert (tmp_path / "xdg/attnpipe/scheduler/schedules.db").exists()
    schedule_list(ATTNPIPE_SCHEDULER_DIR=str(tmp_path / "chosen"))
    assert (tmp_path / "chosen/schedules.db").exists()
    assert list(work.iterdir()) == []


def test_a_cluster_that_has_just_started_gets_the_submission_once_its_agent_is_up(monkeypatch):
    """The dashboard answers 500 "No available agent to submit job" until the head node's
    agent has registered (seen on this machine about 20 s after `ray start`): retried; any
    other refusal is one line at once."""
    from pipeline.errors import UserError
    from pipeline.jobs import submit
    from pipeline.jobs.submit import Cluster

    replies: list[Exception | str] = []

    class Client:
        def submit_job(self, **kwargs: Any) -> str:
            reply = replies.pop(0)
            if isinstance(reply, Exception):
                raise reply
            return reply

    ray = Cluster.__new__(Cluster)  # no cluster: the Jobs API's replies are faked
    ray.address, ray.client = "http://127.0.0.1:8265", Client()
    monkeypatch.setattr(submit.time, "sleep", lambda s: None)
    busy = "Request failed with status code 500: No available agent to submit job, try later."
    replies += [RuntimeError(busy), RuntimeError(busy), "sid-1"]
    assert ray.submit(submission_id="sid-1") == "sid-1" and replies == []
    replies += [RuntimeError("Request failed with status code 400: bad runtime_env"), "never"]
    with pytest.raises(UserError, match="bad runtime_env"):
        ray.submit(submission_id="sid-2")
    assert replies == ["never"]


def git_head() -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout.strip()
