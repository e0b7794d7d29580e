"""A local `mlflow server`: bound to 127.0.0.1, started and stopped by process group."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pipeline.runtime import free_port


class MlflowServer:
    """`mlflow server` for one store on 127.0.0.1 (a free port unless given), in its own
    process group, which can be stopped (by that group, never by name) and started again
    on the same port and store: `attnpipe ui`, tests and benchmarks use it."""

    def __init__(
        self,
        root: Path,
        store_uri: str | None = None,
        port: int | None = None,
        artifacts: Path | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.root = Path(root)
        self.store_uri = store_uri or f"sqlite:///{self.root / 'mlflow.db'}"
        self.artifacts = artifacts or self.root / "artifacts"
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = self.root / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        # SIGTERM to the server when this process dies, however it dies (a killed benchmark)
        self.die_with_parent = die_with_parent

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        cmd = [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
            "--backend-store-uri", self.store_uri,
            "--artifacts-destination", str(self.artifacts),
        ]  # fmt: skip
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        deadline = time.monotonic() + 60
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text()[-2000:]
                self.stop()
                raise RuntimeError(f"mlflow server did not start:\n{tail}")
            time.sleep(0.1)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as reply:
                return reply.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM to the process group started here (the CLI and its uvicorn child);
        SIGKILL if it lingers; return once no process of the group is left."""
        if self.proc is None:
            return
        group, self.proc = self.proc.pid, None
        for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(group, os.WNOHANG)  # reap the CLI, our child
                try:
                    os.killpg(group, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.05)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (the mlflow CLI forwards it
    to its uvicorn child)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
