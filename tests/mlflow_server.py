"""A real `mlflow server` for tests (pipeline.tracking.server): on a free loopback port and a
SQLite store, stopped and started again on the same port (an outage), always stopped by
its process group."""

from __future__ import annotations

import time
from collections.abc import Callable

from pipeline.runtime import free_port
from pipeline.tracking.server import MlflowServer

__all__ = ["MlflowServer", "free_port", "wait_for"]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
