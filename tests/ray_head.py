"""A real Ray head node for tests, started as the README tells a user to start a cluster on
this machine: `.venv/bin/ray start --head --block` with its dashboard (the Jobs API), token
authentication on, every port free, and a temp folder of its own (so no other `ray.init()`
on the machine finds it).

- Only on loopback: with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray's single-node mode, the
  default on macOS and Windows) `--node-ip-address 127.0.0.1` stays 127.0.0.1, and every
  Ray process listens there; without it Ray replaces it with the machine's address and its
  GCS, raylet and workers listen on every interface. `listening()` says where it listens.
- Without the virtual environment on its PATH, as `.venv/bin/ray start` is run from a shell
  that has not activated it: the `python` that PATH finds is another one (or none), so a
  job whose entrypoint relied on it would fail.

Stopped by its process group and the process ids it started, never by `ray stop`, which
stops every cluster on the machine."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from mlflow_server import free_port


def same(a: str, b: str) -> bool:
    """Two names of one folder."""
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return False


class RayHead:
    def __init__(self, num_cpus: int = 2) -> None:
        # Short: Ray's unix sockets live under the temp folder (a 107-byte path limit).
        self.root = Path(tempfile.mkdtemp(prefix="ar", dir="/tmp"))
        self.token_path = self.root / "token"
        self.token_path.write_text(secrets.token_hex(32))
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.num_cpus = num_cpus
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        """The environment of a client of this cluster: its address and token."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDR"))}
        return {**env, "RAY_ADDRESS": self.address, "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    def start(self) -> None:
        ports = {
            "--port": free_port(),
            "--dashboard-port": self.dashboard_port,
            "--ray-client-server-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
        }
        bin_dir = str(Path(sys.executable).parent)
        cmd = [
            os.path.join(bin_dir, "ray"), "start", "--head", "--block",
            "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
            "--num-cpus", str(self.num_cpus), "--temp-dir", str(self.root / "ray"),
            "--disable-usage-stats",
            *(str(x) for pair in ports.items() for x in pair),
        ]  # fmt: skip
        env = {k: v for k, v in self.env().items() if k not in ("RAY_ADDRESS", "VIRTUAL_ENV")}
        path = [p for p in env.get("PATH", "").split(os.pathsep) if p and not same(p, bin_dir)]
        env.update(
            RAY_AUTH_MODE="token", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PATH=os.pathsep.join(path)
        )
        with open(self.root / "ray.log", "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + 120
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.root / "ray.log").read_text()[-3000:]
                self.stop()
                raise RuntimeError(f"ray start did not come up:\n{tail}")
            time.sleep(0.2)

    def healthy(self) -> bool:
        request = urllib.request.Request(
            f"{self.address}/api/version",
            headers={"Authorization": f"Bearer {self.token_path.read_text()}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=2) as reply:
                return bool(json.loads(reply.read()).get("ray_version"))
        except (OSError, ValueError):
            return False

    def processes(self) -> list[Any]:
        """The head's processes (psutil), those that left its process group included."""
        import psutil

        if self.proc is None:
            return []
        with contextlib.suppress(psutil.Error):
            head = psutil.Process(self.proc.pid)
            return [head, *head.children(recursive=True)]
        return []

    def listening(self) -> set[str]:
        """The addresses its processes accept TCP connections on."""
        import psutil

        found = set()
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                for conn in proc.net_connections(kind="tcp"):
                    if conn.status == psutil.CONN_LISTEN:
                        found.add(conn.laddr.ip)
        return found

    def stop(self) -> None:
        """SIGTERM to the process group and to every process the head started, then
        SIGKILL to those still there (psutil checks that a process is the same one before
        it signals it)."""
        import psutil

        if self.proc is None:
            return
        started = self.processes()  # some leave the group
        group, self.proc = self.proc.pid, None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        for proc in started:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(started, timeout=5)  # a disposable cluster: no long grace
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=10)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(group, os.WNOHANG)
