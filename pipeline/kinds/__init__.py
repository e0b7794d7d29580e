"""The job kinds: each module declares its `Kind` (the runner `attnpipe run` dispatches
to, whether it trains, and its own check of a spec beyond the schema), and this table
names them. pipeline/config/ imports no kind; `load_job` hands the kind's check to the
spec loader, so `attnpipe validate` reports a kind's problem as one line, like the
schema's."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.config import JobSpec, load_spec
from pipeline.kinds import compare, evaluate, preprocess, retrain, train
from pipeline.kinds.base import Job, Kind

KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        preprocess.KIND,
        train.TRAIN,
        train.PIPELINE,
        evaluate.KIND,
        retrain.KIND,
        compare.KIND,
    )
}


def kind_of(spec: JobSpec) -> Kind:
    return KINDS[spec.job.kind]


def check_job(spec: JobSpec) -> None:
    """The spec's kind's own check (a FieldError names the key)."""
    check = kind_of(spec).check
    if check is not None:
        check(spec)


def load_job(path: str | Path | None, overrides: Sequence[str] = ()) -> JobSpec:
    """`load_spec` with the kind's check: a spec `attnpipe run` can run."""
    return load_spec(path, overrides, check=check_job)


__all__ = ["KINDS", "Job", "Kind", "check_job", "kind_of", "load_job"]
