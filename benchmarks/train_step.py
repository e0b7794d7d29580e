"""Training-step cost of attnpipe's worker loop, side by side in one run, one process:

- attnpipe's `Worker` (DeepSpeed ZeRO 0, 1, 2, world size 1) against the baseline, a plain
  PyTorch AdamW loop written here: the same model (models.transformer.build_model, the same
  seed), the same batches (the same ShardReader over the same shards), the same causal-LM
  loss, optimizer hyperparameters, LR schedule and gradient clipping. The configurations
  take turns, repeat after repeat, so drifts of the machine fall on all of them alike;
  warm-up steps are not timed.
- the cost of MLflow logging per step: the ZeRO-0 worker also takes turns logging every
  step (log_interval 1, the worst case) through attnpipe's own path, `train_metrics` then
  `Worker.log` into a `MetricBuffer`, to a real `mlflow server` on a loopback port; for
  context, a synchronous `MlflowClient.log_batch` of the same metrics per step.
- MFU: the model's training FLOPs per token (pipeline.train.flops) times tokens per second,
  over the fp32 matrix-multiply peak measured in this run (measured_gemm_flops).
- per-rank optimizer memory of ZeRO 1, 2, 3 at world size 2 against ZeRO 0: two processes
  (gloo), each building attnpipe's Worker for every stage and taking one step, fp32 (the
  job default, and what is timed) and bf16.

Step times are taken over "quiet" steps: the machine may be shared, so each step records
the CPU time other processes took meanwhile (see Meter), and --wait-quiet waits for an idle
machine before every turn. A per-step breakdown (forward, backward, gradient reduction,
optimizer) and the page faults per step say where the differences come from. About three
minutes on an idle 2-core machine, plus any waiting.

    python benchmarks/train_step.py --wait-quiet 120 --out benchmarks/results/train_step.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import resource
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.data.shards import PAD_DOC, write_random_documents
from pipeline.runtime import free_port
from pipeline.tracking.server import MlflowServer
from pipeline.train.objectives import documents_or_none, padding_or_none
from pipeline.train.ops import CPU_WORKER_ENV, init_loopback_group

ZERO_TIMED = (0, 1, 2)
ZERO_MEMORY = (0, 1, 2, 3)
IGNORE = -100


# --------------------------------------------------------------------------- data and spec


def resolved_spec(args: argparse.Namespace, zero_stage: int, world: int) -> dict[str, Any]:
    """The job spec, through attnpipe's own loader and validator, as the driver sends it."""
    from pipeline.config import load_spec

    overrides = [
        f"model.vocab_size={args.vocab}",
        f"model.d_model={args.d_model}",
        f"model.n_layers={args.n_layers}",
        f"model.n_heads={args.n_heads}",
        f"model.max_seq_len={args.seq_len}",
        f"data.seq_len={args.seq_len}",
        f"data.tokenizer.vocab_size={args.vocab}",
        f"training.micro_batch_size={args.micro_batch}",
        f"training.global_batch_size={args.micro_batch * world}",
        "training.steps=1000",
        "training.log_interval=1",
        f"deepspeed.zero_stage={zero_stage}",
        f"resources.num_workers={world}",
        f"resources.cpus_per_worker={max(1, (os.cpu_count() or 1) // world)}",
    ]
    return load_spec(None, overrides).model_dump(mode="json")


# --------------------------------------------------------------------------- the baseline


class PlainLoop:
    """The baseline: what one writes by hand in PyTorch. The same model and initial weights,
    the same batches and loss, torch.optim.AdamW with the job's hyperparameters and weight
    decay groups, the same warmup-cosine schedule, clip_grad_norm_."""

    def __init__(self, spec_dict: dict[str, Any], data_dir: Path) -> None:
        from models.transformer import build_model
        from pipeline.config import validate_spec
        from pipeline.data.reader import ShardReader

        spec = validate_spec(spec_dict)
        t, opt = spec.training, spec.training.optimizer
        torch.manual_seed(t.seed)
        self.model = build_model(spec.model.architecture(), spec.attention)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=opt.lr,
            betas=opt.betas,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
        )
        warmup, total, floor = t.lr_schedule.warmup_steps, t.steps, t.lr_schedule.min_lr_ratio

        def lr_at(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_at)
        self.reader = ShardReader(data_dir, "train", seed=t.seed)
        self.micro, self.clip = t.micro_batch_size, t.grad_clip

    def step(self, step: int) -> float:
        batch = self.reader.next_batch(self.micro)  # (B, 2, S + 1) uint32
        tokens = torch.from_numpy(batch[:, 0].astype(np.int64))
        docs = torch.from_numpy(batch[:, 1].astype(np.int64))
        real = docs != int(PAD_DOC)
        labels = tokens[:, 1:].masked_fill(~real[:, 1:], IGNORE)
        logits = self.model(  # the masks as the objective passes them: None when no-ops
            tokens[:, :-1],
            key_padding_mask=padding_or_none(real[:, :-1]),
            document_ids=documents_or_none(docs[:, :-1]),
        )
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


# --------------------------------------------------------------------------- attnpipe


def quiet_deepspeed() -> None:
    import warnings

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def build_worker(spec: dict[str, Any], data_dir: Path, run_dir: Path, rank: int, world: int) -> Any:
    from pipeline.train.worker import Worker, WorkerConfig

    worker = Worker(
        WorkerConfig(spec=spec, data_dir=str(data_dir), run_dir=str(run_dir)), rank, world
    )
    worker.build()
    return worker


# --------------------------------------------------------------------------- timing
# This machine may be shared (two cores, other people's test runs). Wall-clock times of
# steps during which other processes took CPU are not this code's cost, and an OpenMP
# loop whose threads wait on a busy core is slowed far more than its share. So every step
# also records `foreign_s`: CPU seconds the whole machine spent outside this process while
# the step ran (/proc/stat minus /proc/self/stat), and the figures are taken over the
# "quiet" steps, where that was under --quiet-share of the step's wall time.

TICK = os.sysconf("SC_CLK_TCK")


def cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks of this process, all its threads)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(
            int, f.readline().split()[1:9]
        )
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return user + nice + system + irq + softirq + steal, int(fields[11]) + int(fields[12])


class Meter:
    """Wall, own-CPU and foreign-CPU seconds of a `with` block, and its minor page faults
    (fresh memory the kernel had to map and zero: large temporaries freed with munmap)."""

    def __enter__(self) -> Meter:
        self.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        self.ticks, self.start = cpu_ticks(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.start
        busy, own = cpu_ticks()
        self.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.faults
        self.own = (own - self.ticks[1]) / TICK
        self.foreign = max(0, (busy - self.ticks[0]) - (own - self.ticks[1])) / TICK

    def record(self) -> dict[str, float]:
        return {
            "step_s": self.wall,
            "cpu_s": self.own,
            "foreign_s": self.foreign,
            "minor_faults": float(self.faults),
        }


def wait_until_quiet(limit_s: float, share: float = 0.1, window_s: float = 5.0) -> float:
    """Wait, at most `limit_s`, for a `window_s` window in which other processes used under
    `share` of a core; returns their share in the last window."""
    deadline = time.monotonic() + limit_s
    while True:
        with Meter() as m:
            time.sleep(window_s)
        foreign = m.foreign / m.wall
        if foreign < share or time.monotonic() > deadline:
            return foreign
        print(f"waiting: other processes use {foreign:.0%} of a core", file=sys.stderr, flush=True)


def summary(times: list[float]) -> dict[str, float]:
    return {"min": min(times), "median": statistics.median(times), "n": len(times)}


def quiet(rows: list[dict[str, float]], share: float, least: int = 3) -> list[dict[str, float]]:
    """The rows measured while other processes used under `share` of a core; all rows
    when fewer than `least` were."""
    calm = [r for r in rows if r["foreign_s"] <= share * r["step_s"]]
    return calm if len(calm) >= least else rows


def timed_loop(
    runners: dict[str, Callable[[int], dict[str, float]]],
    warmup: int,
    steps: int,
    repeats: int,
    between: Callable[[], None],
) -> dict[str, list[list[dict[str, float]]]]:
    """Each runner takes `warmup` untimed steps; then, `repeats` times, each runner in turn
    takes `steps` steps, `between` running before every turn. A runner returns the
    timings (seconds) of one step."""
    counters = dict.fromkeys(runners, 0)

    def go(name: str) -> dict[str, float]:
        out = runners[name](counters[name])
        counters[name] += 1
        return out

    for name in runners:
        for _ in range(warmup):
            go(name)
        print(f"warm: {name}", file=sys.stderr, flush=True)
    records: dict[str, list[list[dict[str, float]]]] = {name: [] for name in runners}
    for r in range(repeats):
        for name in runners:
            between()
            records[name].append([go(name) for _ in range(steps)])
            rows = records[name][-1]
            step_s = statistics.median(x["step_s"] for x in rows)
            foreign = sum(x["foreign_s"] for x in rows) / sum(x["step_s"] for x in rows)
            print(
                f"repeat {r} {name}: {step_s:.3f} s/step, other processes {foreign:.0%} of a core",
                file=sys.stderr,
                flush=True,
            )
    return records


def step_runner(step_fn: Callable[[int], float], losses: list[float]) -> Callable[[int], dict]:
    def run(step: int) -> dict[str, float]:
        with Meter() as m:
            losses.append(float(step_fn(step)))  # the step's one host sync, as at a log step
        return m.record()

    return run


def logged_runner(
    worker: Any, losses: list[float], logged: dict[str, int]
) -> Callable[[int], dict[str, float]]:
    """Worker.run's path at log_interval 1: train_step, train_metrics, log. step_s is the
    whole of it, as the loop pays it; the parts are kept too. `logged` counts the points."""

    def run(step: int) -> dict[str, float]:
        with Meter() as m:
            start = time.perf_counter()
            loss = worker.train_step(step)
            trained = time.perf_counter()
            metrics = worker.train_metrics([loss], trained - start)
            measured = time.perf_counter()
            worker.log(metrics, step + 1)
            done = time.perf_counter()
        losses.append(float(loss))
        logged["points"] += len(metrics)
        return {
            **m.record(),
            "train_step_s": trained - start,
            "train_metrics_s": measured - trained,
            "log_s": done - measured,
        }

    return run


def sync_log_batch_seconds(uri: str, experiment_id: str, metrics: dict, n: int) -> list[float]:
    """A synchronous MlflowClient.log_batch of the same metrics, per step, n times."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run_id = client.create_run(experiment_id, run_name="sync-log-batch").info.run_id
    times = []
    for step in range(n):
        now = int(time.time() * 1000)
        points = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        start = time.perf_counter()
        client.log_batch(run_id, metrics=points)
        times.append(time.perf_counter() - start)
    client.set_terminated(run_id)
    return times


class Laps:
    """Seconds spent inside chosen methods of chosen objects, accumulated per label: the
    methods are replaced on the instances (nested calls are counted in both labels)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, obj: Any, method: str, label: str) -> None:
        inner = getattr(obj, method)

        def timed(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start

        setattr(obj, method, timed)

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


def breakdown(
    plain: PlainLoop,
    workers: dict[int, Any],
    steps: int,
    share: float,
    between: Callable[[], None],
) -> dict[str, Any]:
    """Where a step's time goes, per configuration, after the timed loop (the timers wrap
    methods of these very objects, so they run last): medians over the quiet ones of
    `steps` steps, taken in turns. For a worker, `engine.backward` includes the gradient
    reduction (`engine.allreduce_gradients`) and `engine.step` the torch optimizer's step."""
    laps = Laps()
    laps.wrap(plain.model, "forward", "forward")
    laps.wrap(plain.optimizer, "step", "optimizer.step")
    for z, w in workers.items():
        engine = w.engine
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        for method, label in (
            ("forward", "forward"),
            ("backward", "engine.backward"),
            ("allreduce_gradients", "engine.allreduce_gradients"),
            ("step", "engine.step"),
        ):
            laps.wrap(engine, method, f"zero{z}:{label}")
        laps.wrap(inner, "step", f"zero{z}:optimizer.step")
    runs: dict[str, list[dict[str, float]]] = {}
    fns: dict[str, Callable[[int], float]] = {"plain": plain.step}
    fns.update({f"zero{z}": w.train_step for z, w in workers.items()})
    counters = dict.fromkeys(fns, 10_000)
    for _ in range(steps):
        for name, fn in fns.items():
            between()
            laps.take()
            with Meter() as m:
                fn(counters[name])
            counters[name] += 1
            parts = {k.split(":")[-1]: v for k, v in laps.take().items()}
            runs.setdefault(name, []).append({**m.record(), **parts})
    out: dict[str, Any] = {}
    for name, rows in runs.items():
        calm = quiet(rows, share, least=1)
        out[name] = {k: statistics.median(r[k] for r in calm) for k in rows[0]}
        out[name]["steps"] = len(calm)
    return out


# --------------------------------------------------------------------------- ZeRO memory


def optimizer_memory(engine: Any) -> dict[str, int]:
    """Bytes of this rank's optimizer state: Adam's moments (the inner torch optimizer's
    state tensors) plus any master copy of the weights the optimizer holds (the tensors the
    inner optimizer updates, where they are not the model's own parameter storage: ZeRO-1/2's
    `single_partition_of_fp32_groups`, ZeRO-3's `fp32_partitioned_groups_flat` when it is a
    copy). Each storage is counted once."""
    wrapper = engine.optimizer
    inner = getattr(wrapper, "optimizer", wrapper)  # ZeRO wrappers hold the torch optimizer
    model_storages = set()
    model_bytes = 0
    for p in engine.module.parameters():
        for t in (p.data, getattr(p, "ds_tensor", None)):
            if t is not None and t.numel():
                model_storages.add(t.untyped_storage().data_ptr())
                model_bytes += t.numel() * t.element_size()
    # ZeRO-3 hands its fp32 partitions to the torch optimizer only for the duration of
    # step(): the state's keys are the tensors it updates, the param groups may be empty
    updated = {id(p): p for g in inner.param_groups for p in g["params"]}
    updated.update({id(p): p for p in inner.state})
    seen: set[tuple[int, int, int]] = set()

    def new(t: torch.Tensor) -> bool:  # a view counted once, even where views share storage
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        fresh = key not in seen
        seen.add(key)
        return fresh

    moments = master = aliased = 0
    for p in updated.values():
        if not new(p):
            continue
        if p.untyped_storage().data_ptr() in model_storages:
            aliased += p.numel() * p.element_size()
        else:
            master += p.numel() * p.element_size()
    for state in inner.state.values():
        for value in state.values():
            if torch.is_tensor(value) and new(value):
                moments += value.numel() * value.element_size()
    return {
        "optimizer_bytes": moments + master,
        "moments_bytes": moments,
        "master_bytes": master,
        "updated_in_place_of_model_bytes": aliased,
        "model_param_storage_bytes": model_bytes,
        "optimizer_class": f"{type(wrapper).__name__}({type(inner).__name__})",
    }


def memory_rank(
    rank: int, world: int, port: int, args: argparse.Namespace, data_dir: str, out_dir: str
) -> None:
    """One rank of the world-size-2 memory measurement: every stage, one after another."""
    init_loopback_group(rank, world, port)
    quiet_deepspeed()
    results = []
    try:
        for precision in args.memory_precisions:
            for stage in ZERO_MEMORY:
                spec = resolved_spec(args, stage, world)
                spec["training"]["precision"] = precision
                run_dir = Path(out_dir) / f"run-{precision}-{stage}"
                worker = build_worker(spec, Path(data_dir), run_dir, rank, world)
                for step in range(args.memory_steps):
                    worker.train_step(step)
                mem = optimizer_memory(worker.engine)
                mem.update(precision=precision, stage=stage, rank=rank)
                mem["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                results.append(mem)
                del worker
                gc.collect()
                dist.barrier()
                if rank == 0:
                    print(f"memory: {precision} ZeRO-{stage} done", file=sys.stderr, flush=True)
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


def zero_memory(args: argparse.Namespace, data_dir: Path, folder: Path) -> dict[str, Any]:
    import torch.multiprocessing as mp

    world = 2
    folder.mkdir(parents=True, exist_ok=True)
    mp.spawn(
        memory_rank,
        args=(world, free_port(), args, str(data_dir), str(folder)),
        nprocs=world,
        join=True,
    )
    rows = [
        r for rank in range(world) for r in json.loads((folder / f"rank{rank}.json").read_text())
    ]
    out: dict[str, Any] = {}
    for precision in args.memory_precisions:
        mine = [r for r in rows if r["precision"] == precision]
        per_stage = {
            str(s): max((r for r in mine if r["stage"] == s), key=lambda r: r["optimizer_bytes"])
            for s in ZERO_MEMORY
        }
        base = per_stage["0"]
        out[precision] = {
            "per_rank": mine,
            "max_over_ranks": per_stage,
            "ratio_vs_zero0": {
                s: per_stage[s]["optimizer_bytes"] / base["optimizer_bytes"]
                for s in ("1", "2", "3")
            },
            "moments_ratio_vs_zero0": {
                s: per_stage[s]["moments_bytes"] / base["moments_bytes"] for s in ("1", "2", "3")
            },
        }
    return out


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--n-layers", type=int, default=8)
    ap.add_argument("--n-heads", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per turn")
    ap.add_argument("--repeats", type=int, default=6, help="turns of every configuration")
    ap.add_argument("--breakdown-steps", type=int, default=3)
    ap.add_argument(
        "--quiet-share",
        type=float,
        default=0.05,
        help="a step is quiet when other processes used less than this share of a core",
    )
    ap.add_argument(
        "--wait-quiet", type=float, default=0.0, help="seconds to wait for an idle machine"
    )
    ap.add_argument("--sync-log-batches", type=int, default=20)
    ap.add_argument("--memory-steps", type=int, default=1)
    ap.add_argument("--memory-precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--out", default="benchmarks/results/train_step.json")
    ap.add_argument(
        "--glibc-defaults",
        action="store_true",
        help="keep glibc's malloc defaults instead of the CPU_WORKER_ENV attnpipe's CPU "
        "training workers run with (the plain loop shares the process, so both get it)",
    )
    args = ap.parse_args()
    if not args.glibc_defaults and any(os.environ.get(k) != v for k, v in CPU_WORKER_ENV.items()):
        # glibc reads these when the process starts: start again with them
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **CPU_WORKER_ENV})
    # a SIGTERM (a timeout, a kill) unwinds like an exception, so the mlflow server the
    # `with` block started is stopped and the temporary folder removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    started = time.perf_counter()
    foreign_at_start = wait_until_quiet(args.wait_quiet) if args.wait_quiet else None
    load_start = os.getloadavg()

    import deepspeed
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.buffer import MetricBuffer
    from pipeline.train.flops import measured_gemm_flops

    with (
        tempfile.TemporaryDirectory() as tmp,
        MlflowServer(Path(tmp), die_with_parent=True) as server,
    ):
        folder = Path(tmp)
        data_dir = folder / "data"
        samples = (
            args.micro_batch
            * 2
            * (args.warmup * 2 + args.repeats * args.steps * 2 + args.memory_steps * 8)
        )
        write_random_documents(data_dir, args.seq_len, args.vocab, max(64, samples))

        init_loopback_group(0, 1, free_port())
        quiet_deepspeed()
        spec = {z: resolved_spec(args, z, 1) for z in ZERO_TIMED}
        threads = max(1, int(spec[0]["resources"]["cpus_per_worker"]))
        torch.set_num_threads(threads)

        # the peak first, on an idle machine, with the threads training uses
        cpu = torch.device("cpu")
        with Meter() as gemm_meter:
            gemm = {
                str(n): max(
                    measured_gemm_flops(cpu, torch.float32, n=n, repeats=5) for _ in range(3)
                )
                for n in (1024, 2048)
            }
        peak = max(gemm.values())
        print(f"fp32 GEMM peak: {peak / 1e9:.1f} GFLOP/s", file=sys.stderr, flush=True)

        plain = PlainLoop(spec[0], data_dir)
        workers = {
            z: build_worker(spec[z], data_dir, folder / f"run-{z}", 0, 1) for z in ZERO_TIMED
        }
        mlflow_worker = build_worker(spec[0], data_dir, folder / "run-mlflow", 0, 1)

        client = MlflowClient(server.uri)
        experiment_id = client.create_experiment("train-step-benchmark")
        run_id = client.create_run(experiment_id, run_name="metric-buffer").info.run_id
        mlflow_worker.metrics = MetricBuffer(
            server.uri, run_id, capacity=mlflow_worker.spec.tracking.buffer_size
        )

        losses: dict[str, list[float]] = {name: [] for name in ("plain", "zero0", "zero1", "zero2")}
        losses["zero0_mlflow"] = []
        runners = {"plain": step_runner(plain.step, losses["plain"])}
        for z, w in workers.items():
            runners[f"zero{z}"] = step_runner(w.train_step, losses[f"zero{z}"])
        logged = {"points": 0}
        runners["zero0_mlflow"] = logged_runner(mlflow_worker, losses["zero0_mlflow"], logged)
        peaks: list[dict[str, float]] = []

        def between() -> None:
            """Before each turn: wait for a quiet machine (--wait-quiet), then sample the
            GEMM peak again; the peak is the best sample, which needs one quiet moment."""
            if args.wait_quiet:
                wait_until_quiet(args.wait_quiet, window_s=1.0)
            with Meter() as m:
                flops = measured_gemm_flops(cpu, torch.float32, n=2048, repeats=3)
            peaks.append({"flops": flops, "foreign_cpu_share": m.foreign / m.wall})

        records = timed_loop(runners, args.warmup, args.steps, args.repeats, between)

        print("breakdown", file=sys.stderr, flush=True)
        phases = breakdown(plain, workers, args.breakdown_steps, args.quiet_share, between)
        peak = max(peak, *(x["flops"] for x in peaks))
        sample_metrics = mlflow_worker.train_metrics([losses["zero0"][-1]], 1.0)
        counts = mlflow_worker.metrics.close(timeout=60.0)
        client.set_terminated(run_id)
        logged_points = logged["points"]
        stored = {k: len(client.get_metric_history(run_id, k)) for k in sorted(sample_metrics)}
        sync_times = sync_log_batch_seconds(
            server.uri, experiment_id, sample_metrics, args.sync_log_batches
        )
        flops_per_token = workers[0].flops_per_token
        tokens_per_step = workers[0].tokens_per_step
        attnpipe_peak = workers[0].peak.flops  # after the steps: raised to any rate reached
        del plain, workers, mlflow_worker, runners
        gc.collect()
        dist.destroy_process_group()

        memory = zero_memory(args, data_dir, folder / "memory")

    everything = {name: [x for rep in reps for x in rep] for name, reps in records.items()}
    rows = {name: quiet(r, args.quiet_share) for name, r in everything.items()}

    def flat(name: str, key: str = "step_s") -> list[float]:
        return [x[key] for x in rows[name]]

    step = {name: summary(flat(name)) for name in records}
    step_all = {name: summary([x["step_s"] for x in r]) for name, r in everything.items()}
    quiet_steps = {
        name: {
            "quiet": sum(x["foreign_s"] <= args.quiet_share * x["step_s"] for x in r),
            "of": len(r),
            "figures_use_all_steps": len(rows[name]) == len(r),
            "foreign_cpu_share_median": statistics.median(x["foreign_s"] / x["step_s"] for x in r),
        }
        for name, r in everything.items()
    }
    per_repeat = {
        name: [statistics.median(x["step_s"] for x in rep) for rep in reps]
        for name, reps in records.items()
    }
    overhead_median = {
        str(z): step[f"zero{z}"]["median"] / step["plain"]["median"] - 1 for z in ZERO_TIMED
    }
    overhead_min = {str(z): step[f"zero{z}"]["min"] / step["plain"]["min"] - 1 for z in ZERO_TIMED}
    overhead_all = {
        str(z): step_all[f"zero{z}"]["median"] / step_all["plain"]["median"] - 1 for z in ZERO_TIMED
    }
    cpu = {name: summary(flat(name, "cpu_s")) for name in records}
    faults = {name: statistics.median(flat(name, "minor_faults")) for name in records}
    log_s = summary(flat("zero0_mlflow", "log_s"))
    metrics_s = summary(flat("zero0_mlflow", "train_metrics_s"))
    base_step = step["zero0"]["median"]
    mlflow_overhead = log_s["median"] / base_step
    tokens_per_s = {name: tokens_per_step / s["median"] for name, s in step.items()}
    mfu = {name: flops_per_token * tps / peak for name, tps in tokens_per_s.items()}
    primary = args.memory_precisions[0]
    ratio = memory[primary]["ratio_vs_zero0"]

    result: dict[str, Any] = {
        "loop_overhead": overhead_median,
        "loop_overhead_min": overhead_min,
        "loop_overhead_all_steps": overhead_all,
        "mlflow_overhead": mlflow_overhead,
        "mfu": mfu["zero0"],
        "gemm_peak_flops": peak,
        "zero_opt_memory_ratio": ratio,
        "targets": {
            "loop_overhead_at_most_0.10": {
                str(z): {"median": overhead_median[str(z)], "met": overhead_median[str(z)] <= 0.10}
                for z in ZERO_TIMED
            },
            "mlflow_overhead_at_most_0.01": {
                "value": mlflow_overhead,
                "met": mlflow_overhead <= 0.01,
            },
            "zero_opt_memory_ratio_at_most_0.55": {
                f"{precision} ZeRO-{s}": {
                    "value": memory[precision]["ratio_vs_zero0"][s],
                    "met": memory[precision]["ratio_vs_zero0"][s] <= 0.55,
                }
                for precision in args.memory_precisions
                for s in ("2", "3")
            },
        },
        "step_time_s": step,
        "step_time_s_all_steps": step_all,
        "quiet_steps": quiet_steps,
        "quiet_share": args.quiet_share,
        "step_time_s_per_repeat_median": per_repeat,
        "step_cpu_s": cpu,
        "step_minor_page_faults_median": faults,
        "step_breakdown_s": phases,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "foreign_cpu_share_before_start": foreign_at_start,
        "steps_per_s_median": {name: 1 / s["median"] for name, s in step.items()},
        "loss_first_steps": {name: v[: args.warmup + 1] for name, v in losses.items()},
        "mlflow": {
            "what": "zero0_mlflow is the ZeRO-0 worker at log_interval 1: train_step, then "
            "train_metrics, then Worker.log into a MetricBuffer to a local `mlflow server`. "
            "mlflow_overhead = median Worker.log time / median zero0 step time",
            "log_s": log_s,
            "train_metrics_s": metrics_s,
            "logging_path_overhead": (log_s["median"] + metrics_s["median"]) / base_step,
            "end_to_end_overhead": step["zero0_mlflow"]["median"] / base_step - 1,
            "sync_log_batch_s": summary(sync_times),
            "sync_log_batch_overhead": statistics.median(sync_times) / base_step,
            "metrics_per_step": len(sample_metrics),
            "buffer_counts": counts,
            "points_logged": logged_points,
            "all_delivered": counts["delivered"] == logged_points
            and counts["dropped"] == 0
            and counts["undelivered"] == 0,
            "stored_history_lengths": stored,
        },
        "mfu_detail": {
            "flops_per_token": flops_per_token,
            "tokens_per_step": tokens_per_step,
            "tokens_per_s_median": tokens_per_s,
            "mfu_median": mfu,
            "gemm_flops_by_size": gemm,
            "attnpipe_in_loop_peak": attnpipe_peak,
            "gemm_first_measurement_foreign_cpu_share": gemm_meter.foreign / gemm_meter.wall,
            "gemm_samples_between_turns": peaks,
            "peak": "the best of measured_gemm_flops(cpu, float32, n): n = 1024 and 2048, 3 x 5 "
            "runs before the loop, then n = 2048, 3 runs, before every turn; with the threads "
            "training uses",
        },
        "zero_memory": {
            "what": "per rank, world size 2: Adam's exp_avg and exp_avg_sq (and step) tensors "
            "plus the master copy of the weights the optimizer updates where it is not the "
            "model's own parameter storage; each storage counted once; gradients and "
            "communication buffers not counted. Ratio: the larger rank's bytes over ZeRO-0's",
            "primary_precision": primary,
            "steps_before_measuring": args.memory_steps,
            **memory,
        },
        "config": {
            "model": {
                "d_model": args.d_model,
                "n_layers": args.n_layers,
                "n_heads": args.n_heads,
                "vocab_size": args.vocab,
                "seq_len": args.seq_len,
                "parameters": sum(p.numel() for p in build_param_count(spec[0])),
            },
            "micro_batch_size": args.micro_batch,
            "grad_accum_steps": 1,
            "precision_timed": "fp32",
            "warmup_steps": args.warmup,
            "timed_steps_per_turn": args.steps,
            "repeats": args.repeats,
            "order": list(records),
            "spec_zero0": spec[0],
            "data": "synthetic packed documents (16-1500 tokens), uniform random ids",
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "threads": threads,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "mlflow": mlflow.__version__,
            "malloc_env": {k: os.environ.get(k) for k in CPU_WORKER_ENV},
        },
        "runtime_s": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    keys = ("loop_overhead", "loop_overhead_min", "mlflow_overhead", "mfu", "gemm_peak_flops")
    print(json.dumps({k: result[k] for k in (*keys, "zero_opt_memory_ratio")}, indent=1))
    print(f"wrote {out} in {result['runtime_s']:.0f} s", file=sys.stderr)


def build_param_count(spec: dict[str, Any]) -> list[torch.nn.Parameter]:
    from models.transformer import build_model
    from pipeline.config import validate_spec

    s = validate_spec(spec)
    with torch.device("meta"):
        return list(build_model(s.model.architecture(), s.attention).parameters())


if __name__ == "__main__":
    main()
