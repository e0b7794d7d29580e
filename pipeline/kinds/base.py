"""What a job kind is: the runner `attnpipe run` dispatches to, whether it trains (so the
run checks the resume target, the GPUs and the cluster first, and starts Ray for training
workers), and the kind's own check of a spec beyond the schema (pipeline/config/), run
when the spec is loaded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config import Check, JobSpec


@dataclass(frozen=True)
class Job:
    """A job as its kind's runner gets it: the spec, a progress printer, the MLflow
    tracking URI, and for a training kind the checkpoint to resume from and any faults a
    test injects."""

    spec: JobSpec
    show: Callable[[str], None]
    uri: str
    resume_from: str | None = None
    faults: dict[str, Any] | None = None


def _as_is(result: dict[str, Any]) -> dict[str, Any]:
    return result


@dataclass(frozen=True)
class Kind:
    """`run` runs a job of this kind; `trains`: it starts training workers; `check`: its
    check of a spec beyond the schema (a FieldError naming the key); `summary`: what
    `attnpipe run` prints of the runner's result, as JSON."""

    name: str
    run: Callable[[Job], dict[str, Any]]
    trains: bool
    check: Check | None = None
    summary: Callable[[dict[str, Any]], dict[str, Any]] = _as_is
