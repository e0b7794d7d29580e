"""A job spec as a Ray job, through Ray's Jobs API: `attnpipe submit`, `status`, `logs`,
`stop` and `list`.

A submission carries the resolved spec and the code that runs it. The runtime_env's
working directory holds the spec (one YAML file), `py_modules` carry this installation's
`pipeline` and `models` packages, and the entrypoint runs `<python> -m pipeline.cli run` on
the cluster, so the cluster's Python needs attnpipe's dependencies (its image, or `--pip`),
not attnpipe itself. `<python>` is the interpreter the cluster's Ray runs its workers with
(the head node's raylet says which), not whatever `python` the head node's PATH finds: a
cluster started as `.venv/bin/ray start` without activating the environment runs its
workers in the environment, and its shell's `python` is another one. With `--image` the
job runs in that container image instead, which must have attnpipe installed: Ray allows
no working directory next to an image, so the spec travels in an environment variable.

The driver of a Ray job runs on the head node and mostly waits; it reserves no CPU by
default (`--entrypoint-cpus`), so the workers get all of them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shlex
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.config import JobSpec, resolved_yaml
from pipeline.errors import UserError
from pipeline.tracking import submission_env, ui_url

SPEC_FILE = "attnpipe-spec.yaml"
ACTIVE = ("PENDING", "RUNNING")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
PROBE_TIMEOUT_S = 3.0
# A node's dashboard agent reports its processes every 5 s (REPORTER_UPDATE_INTERVAL_MS):
# a cluster that has just started may not have told its Python yet.
PYTHON_WAIT_S = 15.0
AGENT_WAIT_S = 60.0
START_LOCAL = (
    "to start one on this machine: RAY_AUTH_MODE=token RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "
    "ray start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 (docs/operations.md, "
    "'A cluster on this machine'), then --address http://127.0.0.1:8265"
)


class AlreadySubmitted(UserError):
    """The cluster already holds a job with this submission id."""


class UnknownJob(UserError):
    """The cluster holds no job with this submission id."""


def submission_id(name: str, when: datetime) -> str:
    """`<name>-<UTC time>`: a job's time for `submit`, a slot's time for a schedule."""
    return f"{name}-{when.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}"


# --------------------------------------------------------------------------- the cluster


def cluster_address(address: str | None) -> str:
    """The Jobs API address: --address, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS."""
    value = (
        address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or ""
    ).strip()
    if not value:
        raise UserError(
            f"no Ray cluster address: pass --address http://HOST:8265 or set RAY_ADDRESS; "
            f"{START_LOCAL}"
        )
    if value == "auto" or value.startswith("ray://"):
        raise UserError(
            f"Ray address {value!r}: the Jobs API needs the dashboard's http://HOST:PORT "
            "(port 8265 by default)"
        )
    return (value if "://" in value else f"http://{value}").rstrip("/")


def auth_token() -> tuple[str, str]:
    """Ray token authentication, found where Ray looks: RAY_AUTH_TOKEN, else the file named
    by RAY_AUTH_TOKEN_PATH, else, with RAY_AUTH_MODE=token, ~/.ray/auth_token. Returns the
    token ("" for none) and where it came from."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if not path and os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        path = "~/.ray/auth_token"
    if not path:
        return "", ""
    try:
        return Path(path).expanduser().read_text().strip(), path
    except OSError as exc:
        raise UserError(f"RAY_AUTH_TOKEN_PATH: cannot read {path}: {exc.strerror}") from None


class Cluster:
    """A Ray cluster's Jobs API: reached (within a few seconds), authenticated, and
    wrapped so that every failure is one line."""

    def __init__(self, address: str | None = None) -> None:
        self.address = cluster_address(address)
        token, self.token_source = auth_token()
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._get("/api/version")  # fails fast where Ray's client would wait or retry
        from ray.job_submission import JobSubmissionClient

        self.client = self._call(JobSubmissionClient, self.address, headers=self.headers)

    def _get(self, path: str) -> Any:
        request = urllib.request.Request(self.address + path, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                raise UserError(
                    f"{self.address}: the Ray cluster requires an auth token: set RAY_AUTH_TOKEN "
                    "or RAY_AUTH_TOKEN_PATH (`ray get-auth-token` on its head node prints it)"
                ) from None
            if exc.code == 403:
                raise UserError(
                    f"{self.address}: the Ray cluster refused the auth token from "
                    f"{self.token_source}"
                ) from None
            raise UserError(
                f"{self.address}: not a Ray dashboard with the Jobs API "
                f"(HTTP {exc.code} for {path})"
            ) from None
        except (OSError, ValueError) as exc:  # refused, timed out, no such host, not JSON
            reason = getattr(exc, "reason", None) or exc
            raise UserError(
                f"cannot reach the Ray dashboard at {self.address}: {reason} "
                f"(is the cluster up? {START_LOCAL})"
            ) from None

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Ray's client raises RuntimeError with the server's reply (a traceback for a 500):
        keep its one telling line."""
        try:
            return fn(*args, **kwargs)
        except UserError:
            raise
        except Exception as exc:  # requests' ConnectionError, RuntimeError, AuthenticationError
            text = str(exc)
            if "status code 404" in text:
                raise UnknownJob(
                    f"no job with submission id {args[0]!r} on {self.address}"
                ) from None
            if "already exists" in text and "submission_id" in text:
                raise AlreadySubmitted(
                    f"a job with submission id {kwargs.get('submission_id')!r} "
                    f"already exists on {self.address}"
                ) from None
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            last = next((x for x in reversed(lines) if "Error" in x), lines[-1] if lines else "")
            raise UserError(f"{self.address}: {last or type(exc).__name__}") from None

    def info(self, sid: str) -> Any:
        return self._call(self.client.get_job_info, self._checked(sid))

    def _checked(self, sid: str) -> str:
        """A submission id goes into the Jobs API's URL path: one with '/', '?' or '#'
        would name another endpoint (`?` lists every job), so it is unknown here."""
        if not sid or any(c in sid for c in "/?#%\\") or sid.strip() != sid:
            raise UnknownJob(f"no job with submission id {sid!r} on {self.address}")
        return sid

    def exists(self, sid: str) -> bool:
        try:
            self.info(sid)
        except UnknownJob:
            return False
        return True

    def jobs(self) -> list[Any]:
        """Submitted jobs (not drivers started by hand), oldest first."""
        found = [j for j in self._call(self.client.list_jobs) if j.submission_id]
        return sorted(found, key=lambda j: j.start_time or 0)

    def logs(self, sid: str) -> str:
        return str(self._call(self.client.get_job_logs, self._checked(sid)))

    def submit(self, **kwargs: Any) -> str:
        """JobSubmissionClient.submit_job; the working dir and modules upload here. A cluster
        that has just started answers "No available agent to submit job" until its head
        node's agent has registered (the dashboard waits 10 s for it per request); that is
        retried for AGENT_WAIT_S."""
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return str(self._call(self.client.submit_job, **kwargs))
            except UserError as exc:
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(2.0)

    def stop(self, sid: str) -> bool:
        self.info(sid)  # an unknown id: one line
        return bool(self._call(self.client.stop_job, sid))

    def worker_python(self, anywhere: bool = False) -> str | None:
        """The Python the cluster's Ray starts its workers with (each raylet's
        `--python_worker_command`, in the dashboard's node summary): the head node's, where
        a job's driver runs; with `anywhere` (a driver that reserves CPUs may run on any
        node) the one every reporting node shares. None where the dashboard does not say
        within PYTHON_WAIT_S, or the nodes differ."""
        deadline = time.monotonic() + PYTHON_WAIT_S
        while True:
            found = self._worker_pythons()
            if any(head for head, _ in found):
                if not anywhere:
                    return next(python for head, python in found if head)
                pythons = {python for _, python in found}
                return pythons.pop() if len(pythons) == 1 else None
            if time.monotonic() > deadline:
                return None
            time.sleep(0.5)

    def _worker_pythons(self) -> list[tuple[bool, str]]:
        """(is the head node, its workers' Python) of every live node that reported."""
        try:
            nodes = self._get("/nodes?view=summary")["data"]["summary"]
        except (UserError, KeyError, TypeError):
            return []
        flag, found = "--python_worker_command=", []
        for node in nodes if isinstance(nodes, list) else []:
            raylet = node.get("raylet") or {}
            args = [a for a in node.get("cmdline") or [] if a.startswith(flag)]
            command = shlex.split(args[0].removeprefix(flag)) if args else []
            if raylet.get("state") == "ALIVE" and command:
                found.append((bool(raylet.get("isHeadNode")), command[0]))
        return found

    def total_resources(self) -> dict[str, float] | None:
        """The resources of the cluster's live nodes (Ray's state API), None where the
        cluster does not answer."""
        try:
            nodes = self._get("/api/v0/nodes?limit=10000&detail=false")["data"]["result"]["result"]
        except (UserError, KeyError, TypeError):
            return None
        total: dict[str, float] = {}
        for node in nodes:
            if node.get("state") == "ALIVE":
                for key, value in (node.get("resources_total") or {}).items():
                    total[key] = total.get(key, 0.0) + float(value)
        return total


# --------------------------------------------------------------------------- submission


def check_resources(
    spec: JobSpec, total: dict[str, float], entrypoint_cpus: float, where: str
) -> None:
    """The cluster can hold the workers (and the driver's CPUs) the job asks for: the check
    `attnpipe run` makes on the cluster, made before anything is submitted."""
    if spec.job.kind == "preprocess":
        return
    r = spec.resources
    for key, each, extra, field in (
        ("GPU", r.gpus_per_worker, 0.0, "resources.gpus_per_worker"),
        ("CPU", r.cpus_per_worker, entrypoint_cpus, "resources.cpus_per_worker"),
    ):
        need, have = each * r.num_workers + extra, total.get(key, 0.0)
        if need > have:
            driver = f" + {extra:g} for the driver (--entrypoint-cpus)" if extra else ""
            raise UserError(
                f"{field}: {r.num_workers} workers x {each:g} {key}{driver} = {need:g} {key}s "
                f"requested, the Ray cluster at {where} has {have:g}"
            )


def runtime_env(
    spec: JobSpec,
    sid: str,
    stage: Path,
    image: str | None = None,
    pip: Sequence[str] = (),
    python: str | None = None,
) -> tuple[dict[str, Any], str]:
    """The runtime_env and entrypoint of a submission; `stage` becomes its working dir.
    `python`: the interpreter the cluster runs its workers with; the driver runs in it and
    its folder leads the job's PATH, as if that environment were activated. None (or
    --pip, whose virtualenv Ray activates, or --image): `python` from the PATH."""
    import models
    import pipeline

    text = resolved_yaml(spec)
    # The training driver tags its MLflow run with this: Ray itself passes the submission id
    # to the driver only inside RAY_JOB_CONFIG_JSON_ENV_VAR.
    # the commit of this checkout: the job's working directory travels without .git
    env_vars = {"RAY_JOB_SUBMISSION_ID": sid, **submission_env()}
    if image:
        if pip:
            raise UserError("--pip: Ray installs no packages into an --image; build them into it")
        env_vars["ATTNPIPE_SPEC"] = text
        entry = 'printf "%s" "$ATTNPIPE_SPEC" | python -m pipeline.cli run /dev/stdin'
        return {"image_uri": image, "env_vars": env_vars}, entry
    (stage / SPEC_FILE).write_text(text)
    env: dict[str, Any] = {
        "working_dir": str(stage),
        "py_modules": [str(Path(m.__file__).parent) for m in (pipeline, models)],
        "excludes": ["__pycache__", "*.pyc"],
        "env_vars": env_vars,
    }
    if pip:
        env["pip"] = list(pip)
    elif python:
        # Ray expands ${PATH} on the node, to the PATH its raylet runs with
        env_vars["PATH"] = f"{PurePosixPath(python).parent}:${{PATH}}"
        return env, f"{shlex.quote(python)} -m pipeline.cli run {SPEC_FILE}"
    return env, f"python -m pipeline.cli run {SPEC_FILE}"


def submit_spec(
    spec: JobSpec,
    cluster: Cluster,
    sid: str,
    *,
    image: str | None = None,
    pip: Sequence[str] = (),
    entrypoint_cpus: float = 0.0,
    metadata: dict[str, str] | None = None,
    notes: list[str] | None = None,
) -> str:
    """Submit `spec` under submission id `sid`; AlreadySubmitted where that id exists.
    What the user should know about how it will run is appended to `notes`."""
    total = cluster.total_resources()
    if total is not None:
        check_resources(spec, total, entrypoint_cpus, cluster.address)
    python = None
    if not image and not pip:
        python = cluster.worker_python(anywhere=entrypoint_cpus > 0)
        if python is None and notes is not None:
            notes.append(
                f"the Ray cluster at {cluster.address} did not say which Python runs its "
                "workers: the job runs `python` from the head node's PATH, which must have "
                "attnpipe's dependencies (start Ray from that environment, or pass --pip)"
            )
    tags = {
        "attnpipe.job": spec.job.name,
        "attnpipe.kind": spec.job.kind,
        "attnpipe.experiment": spec.tracking.experiment,
        "attnpipe.tracking_uri": spec.tracking.uri or "",
        **(metadata or {}),
    }
    with tempfile.TemporaryDirectory(prefix="attnpipe-submit-") as stage:
        env, entrypoint = runtime_env(spec, sid, Path(stage), image, pip, python)
        return cluster.submit(
            entrypoint=entrypoint,
            submission_id=sid,
            runtime_env=env,
            metadata=tags,
            entrypoint_num_cpus=entrypoint_cpus,
            entrypoint_num_gpus=0,  # the driver waits; the workers hold the GPUs
        )


def cluster_notes(spec: JobSpec) -> list[str]:
    """What runs differently on a cluster than on this machine."""
    notes = []
    if not spec.tracking.uri:
        notes.append(
            "tracking.uri is not set: the job records its MLflow run in a SQLite file under "
            "storage.work_dir on the cluster"
        )
    work = spec.storage.work_dir
    if "://" not in work and not Path(work).is_absolute():
        notes.append(
            f"storage.work_dir {work!r} is relative: on the cluster it lies inside the job's "
            "working directory, which Ray deletes; use shared storage or an absolute path"
        )
    return notes


def follow(cluster: Cluster, sid: str, write: Callable[[str], Any]) -> Any:
    """Stream the job's logs until it ends; return its final details."""

    async def tail() -> None:
        async for chunk in cluster.client.tail_job_logs(sid):
            write(chunk)

    cluster.info(sid)  # an unknown id: one line
    try:
        asyncio.run(tail())
    except Exception as exc:  # the stream broke: the job's status still tells the end
        write(f"[attnpipe: log stream ended: {str(exc).splitlines()[0] if str(exc) else exc!r}]\n")
    while status_of(details := cluster.info(sid)) not in TERMINAL:
        time.sleep(1.0)
    return details


# --------------------------------------------------------------------------- MLflow link


def mlflow_link(uri: str | None, experiment: str, sid: str | None = None) -> dict[str, str] | None:
    """The MLflow UI page of the job's run (found by its `attnpipe.ray_submission_id` tag),
    else of its experiment, else the UI itself; None where the store has no UI (a file or a
    database) or does not answer."""
    if not uri or not uri.startswith(("http://", "https://")):
        return None
    base = uri.rstrip("/")
    query = urllib.parse.urlencode({"experiment_name": experiment})
    found = _mlflow(base, f"/api/2.0/mlflow/experiments/get-by-name?{query}")
    if not found or "experiment" not in found:
        return {"url": ui_url(base)}
    exp = found["experiment"]["experiment_id"]
    if sid:
        body = {
            "experiment_ids": [exp],
            "filter": f"tags.`attnpipe.ray_submission_id` = '{sid}'",
            "max_results": 1,
        }
        runs = (_mlflow(base, "/api/2.0/mlflow/runs/search", body) or {}).get("runs", [])
        if runs:
            run = runs[0]["info"]["run_id"]
            return {"url": ui_url(base, exp, run), "run_id": run}
    return {"url": ui_url(base, exp)}


def _mlflow(base: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any] | None:
    headers = {"Content-Type": "application/json"}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
        user = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:"
        user += os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
        headers["Authorization"] = f"Basic {base64.b64encode(user.encode()).decode()}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as reply:
            return dict(json.loads(reply.read()))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- reports


def when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def status_of(details: Any) -> str:
    return str(getattr(details.status, "value", details.status))


def describe(details: Any) -> list[str]:
    """`attnpipe status`: the job's state and where its run is."""
    meta = details.metadata or {}
    lines = [
        f"{details.submission_id}: {status_of(details)}",
        f"  message:    {details.message or '-'}",
        f"  started:    {when(details.start_time)} UTC",
        f"  ended:      {when(details.end_time)}{' UTC' if details.end_time else ''}",
        f"  entrypoint: {details.entrypoint}",
    ]
    if meta.get("attnpipe.schedule"):
        lines.append(
            f"  schedule:   {meta['attnpipe.schedule']} (slot {meta.get('attnpipe.slot')})"
        )
    link = mlflow_link(
        meta.get("attnpipe.tracking_uri"),
        meta.get("attnpipe.experiment", ""),
        details.submission_id,
    )
    if link:
        lines.append(f"  mlflow:     {link['url']}")
    return lines


def table(jobs: Sequence[Any]) -> list[str]:
    """`attnpipe list`: one line per submitted job, oldest first."""
    rows = [("SUBMISSION ID", "STATUS", "STARTED (UTC)", "ENDED (UTC)", "JOB")]
    for j in jobs:
        meta = j.metadata or {}
        rows.append(
            (
                j.submission_id,
                status_of(j),
                when(j.start_time),
                when(j.end_time),
                meta.get("attnpipe.job", "-"),
            )
        )
    return columns(rows)


def columns(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows as left-aligned columns, for people and for `grep`."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
