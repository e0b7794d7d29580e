"""`attnpipe run`: execute a job spec on this machine, on an embedded Ray and MLflow."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.config import DataNode, JobSpec
from pipeline.tracking import log_preprocess, tracking_uri, use_experiment
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


def data_dir(spec: JobSpec) -> Path | str:
    """The job's preprocessed data: a local folder, or a URI (`storage.data`)."""
    from pipeline.data.remote import is_uri, join

    base = spec.storage.data
    if base is not None and is_uri(base):
        return join(base, spec.job.name)
    return Path(base or Path(spec.storage.work_dir) / "data") / spec.job.name


def run_preprocess(
    spec: JobSpec,
    show: Any,
    parallelism: int | None = None,
    nested: bool = False,
    log_cached: bool = True,
    data: DataNode | None = None,
    out: Path | str | None = None,
    paired: bool | None = None,
) -> dict[str, Any]:
    """Preprocess the job's data (a cache hit when its fingerprint matches the output) and
    log the run to MLflow; `log_cached=False` logs nothing for a cache hit. `data`, `out`
    and `paired` replace the spec's data node, its output folder and its model's need."""
    from pipeline.data.preprocess import preprocess

    data = data or spec.data
    out = out or data_dir(spec)
    manifest = preprocess(
        data,
        out,
        vocab_size=data.tokenizer.vocab_size or spec.model.vocab_size,
        paired=spec.model.family == "encoder_decoder" if paired is None else paired,
        parallelism=parallelism,
        progress=show,
    )
    if manifest.get("cache_hit") and not log_cached:
        return {**manifest, "mlflow_run_id": None, "out_dir": str(out)}
    uri = tracking_uri(spec.tracking.uri, spec.storage.work_dir)
    run_id = log_preprocess(
        manifest,
        out,
        data.model_dump(mode="json"),
        spec.job.name,
        uri,
        spec.tracking.experiment,
        spec.storage.work_dir,
        nested=nested,
    )
    show(f"MLflow run {run_id} in {uri}")
    return {**manifest, "mlflow_run_id": run_id, "out_dir": str(out)}


def run_job(
    spec: JobSpec, resume_from: str | None = None, faults: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run a job here: `preprocess` writes shards; `train` trains on them (preprocessing
    first when they are missing: a cache hit when they exist); `pipeline` does both under
    one parent MLflow run with a nested run per stage."""
    preprocess_only = spec.job.kind in ("preprocess", "evaluate")  # no training workers
    uri = tracking_uri(spec.tracking.uri, spec.storage.work_dir)
    if not preprocess_only:
        from pipeline.train.driver import check_resources, resume_target

        # a wrong target, or GPUs this machine lacks for the Ray it would start, is one line
        # in seconds, not after a local Ray has started; run_train gets the folder found
        resume = resume_target(spec, resume_from, uri)
        resume_from = str(resume) if resume is not None else None
        if spec.resources.gpus_per_worker and not joins_a_cluster():
            import torch

            check_resources(spec, {"GPU": torch.cuda.device_count()}, "this machine")
    show = progress_printer()
    print_worker_output_once()
    started = (
        start_local_ray(2)
        if preprocess_only
        else start_local_ray(log_to_driver=True, cpu_training=spec.resources.gpus_per_worker == 0)
    )
    try:
        if spec.job.kind == "evaluate":
            from pipeline.evaluate import run_evaluate

            return run_evaluate(spec, show, uri)
        if preprocess_only:
            return run_preprocess(spec, show)
        return _train_or_pipeline(spec, show, uri, resume_from, faults)
    finally:
        if started:  # also stops the thread that forwards the workers' output
            stop_local_ray()


def _train_or_pipeline(
    spec: JobSpec, show: Any, uri: str, resume_from: str | None, faults: dict[str, Any] | None
) -> dict[str, Any]:
    from pipeline.train.driver import check_cluster, run_train

    check_cluster(spec)  # before any preprocessing; run_job has checked the resume target
    if spec.job.kind == "compare":
        from pipeline.compare import run_compare

        return run_compare(spec, show, uri)
    if spec.job.kind == "retrain":
        from pipeline.retrain import run_retrain

        return run_retrain(spec, show, uri)
    if spec.job.kind == "train":
        run_preprocess(spec, show, log_cached=False)  # a cache hit once the shards exist
        return run_train(
            spec, data_dir(spec), uri, resume_from=resume_from, progress=show, faults=faults
        )
    import mlflow

    use_experiment(uri, spec.tracking.experiment, spec.storage.work_dir)
    with mlflow.start_run(run_name=spec.job.name, tags={"attnpipe.stage": "pipeline"}) as parent:
        prep = run_preprocess(spec, show, nested=True)
        result = run_train(
            spec,
            data_dir(spec),
            uri,
            resume_from=resume_from,
            progress=show,
            faults=faults,
            nested=True,
        )
        return {**result, "parent_run_id": parent.info.run_id, "preprocess": prep}
