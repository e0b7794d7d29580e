"""The embedded Ray of `attnpipe run` leaves no process behind, even a worker that cannot
run when the cluster shuts down."""

from __future__ import annotations

import os
import signal

import psutil


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # exited, not yet reaped
    except psutil.NoSuchProcess:
        return True


def test_stop_local_ray_stops_a_worker_that_missed_the_shutdown():
    import ray

    from pipeline.runtime import start_local_ray, stop_local_ray

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    assert start_local_ray(2)

    @ray.remote(num_cpus=0)
    class Worker:
        def pid(self) -> int:
            return os.getpid()

    try:
        worker = Worker.remote()
        pid = ray.get(worker.pid.remote())
        cluster = [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in before]
        assert pid in cluster
        os.kill(pid, signal.SIGSTOP)  # a worker that cannot run: it never sees its raylet go
        stop_local_ray(grace_s=3)
        assert not ray.is_initialized()
        assert gone(pid), f"worker {pid} outlived the cluster"
        left = [p for p in cluster if not gone(p)]
        assert left == [], f"processes of the embedded cluster still running: {left}"
    finally:  # whatever failed above, nothing of the cluster stays
        if ray.is_initialized():
            stop_local_ray(grace_s=3)
