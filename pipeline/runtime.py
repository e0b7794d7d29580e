"""The processes a job runs in on this machine: an embedded Ray (or a connection to the
cluster a job was submitted to), stopped by process id; free loopback ports; progress lines."""

from __future__ import annotations

import time
from typing import Any

from pipeline.train.ops import CPU_WORKER_ENV


def progress_printer() -> Any:
    """Timestamped progress lines on stderr (rich on a terminal, plain in logs). A line is
    never wrapped, so a path stays whole for people and for grep (rich wraps at the
    terminal's width, and at 80 columns where there is no terminal: a job's log), and a
    message is never read as rich markup (a path may hold brackets)."""
    from rich.console import Console

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    start = time.perf_counter()

    def show(message: str) -> None:
        console.print(f"[{time.perf_counter() - start:7.1f}s] {message}", markup=False, emoji=False)

    return show


def print_worker_output_once() -> None:
    """Ray Train replaces `print` in its workers with one that prints the line and also logs
    it to a handler that writes to the console, so every line a worker printed (attnpipe's
    `step N/M ...`, DeepSpeed's notices) reached the driver, and a job's log, twice. Ray
    Train hands this variable from the driver to its controller and workers, where the
    replacement reads it; lines then reach the driver once, through Ray's own forwarding."""
    import os

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def start_local_ray(
    num_cpus: int | None = None, log_to_driver: bool = False, cpu_training: bool = False
) -> bool:
    """An embedded Ray in this process, unless it is already connected to one. The
    dashboard (Ray Train's controller queries its state API) binds 127.0.0.1 on a free
    port. Ray resolves a loopback node address to the machine's own address, so its
    internal ports follow Ray's defaults (token authentication is on by default in 2.60).
    With RAY_ADDRESS set to a cluster (the driver of a Ray job sees its cluster's GCS
    address there) it connects to that cluster instead; never otherwise. A Jobs API URL
    there (`http://127.0.0.1:8265`, exported for `attnpipe submit`) names no cluster to
    run in, and a bare `ray.init()` would join the cluster the machine's last `ray start`
    recorded in /tmp/ray/ray_current_cluster (one started for `attnpipe submit`, or a dead
    one killed by its pid) and refuse `num_cpus` there. `cpu_training`: the workers get
    CPU_WORKER_ENV."""
    import os

    import ray

    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": dict(CPU_WORKER_ENV)} if cpu_training else None
    if joins_a_cluster():
        ray.init(log_to_driver=log_to_driver, runtime_env=runtime_env)  # Ray forbids start args
        return True
    os.environ.pop("RAY_ADDRESS", None)  # a Jobs API URL: not for this Ray's processes either
    # Ray Train's controller polls its workers every 2 s by default, and a run waits on
    # several polls (the group's start, the end): 8 of a 4-step run's 30 s in fit, measured.
    # Its processes inherit this environment; a poll of this machine's workers is cheap.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    ray.init(
        address="local",  # a new instance, whatever runs on the machine
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=free_port(),
        log_to_driver=log_to_driver,
        runtime_env=runtime_env,
    )
    return True


def joins_a_cluster() -> bool:
    """Whether start_local_ray would join a running cluster (RAY_ADDRESS names one, or this
    process is already connected) rather than start an embedded Ray on this machine."""
    import os

    import ray

    address = os.environ.get("RAY_ADDRESS", "")
    return ray.is_initialized() or bool(address and not address.startswith(("http://", "https://")))


def stop_local_ray(grace_s: float = 10.0) -> None:
    """`ray.shutdown()`, then stop by process id whatever the embedded cluster started that
    outlives it. Ray's workers exit when their raylet does, but a worker that cannot run at
    that moment misses it: a Ray Train controller once outlived a shutdown by half an hour.
    The processes are listed before the shutdown (afterwards the workers belong to no one);
    psutil checks that a process is the same one before it signals it. A driver that only
    connected to a cluster started none of its processes and stops none."""
    import contextlib

    import psutil
    import ray
    from ray._private import worker

    started: list[psutil.Process] = []
    node = getattr(worker, "_global_node", None)
    for infos in dict(getattr(node, "all_processes", None) or {}).values():
        for info in infos:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(info.process.pid)
                started += [proc, *proc.children(recursive=True)]
    ray.shutdown()
    _, alive = psutil.wait_procs(started, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()  # SIGKILL: a stopped or wedged worker never acts on a SIGTERM
    psutil.wait_procs(alive, timeout=5)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
