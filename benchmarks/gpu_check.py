"""The GPU check: attnpipe's CUDA paths, in order of risk, into one JSON.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json   # a CUDA machine
    python benchmarks/gpu_check.py --device cpu --out /tmp/gpu_check.json    # tiny, in the suite

1. env: versions, the device, bf16 support, `import triton`, DeepSpeed's `ds_report`.
2. flex: FlexAttention compiled, forward and backward in bf16 at head_dim 64 and 128, with
   documents and padding, for sliding_window, bigbird and longformer, against the reference
   backend; then 3 more steps with fresh masks, counting dynamo's recompiles.
3. blocksparse: forward and backward against the reference; kernels launched (profiler).
4. train: `attnpipe run`, 1 worker, 1 GPU, bf16, a head_dim 64 model at 512 tokens, 4 steps
   with a log, an evaluation and a checkpoint inside; flex, then blocksparse with activation
   checkpointing; ZeRO 0 and 1.
5. resume and export: a run resumed from its checkpoint; `attnpipe export`; the peak memory
   the worker measured (torch.cuda.max_memory_allocated) against `attnpipe plan`; the MFU
   peak chosen for the device.
6. speed: flex against SDPA (flash, dense causal) at 8K-64K tokens for a sliding window
   and BigBird, forward and backward.

`--device cpu` runs every step at tiny sizes (flex forward only and compiled with dynamo's
eager backend: FlexAttention has no CPU backward), so the script cannot rot between the
days a GPU is lent. A step that fails is recorded with its error and the next one runs; the
JSON is rewritten after every step, so a run cut short keeps what it measured. Exit code 1
when any step failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
ATTNPIPE = str(Path(sys.executable).parent / "attnpipe")

# What each device runs: the CPU sizes keep the whole check to a couple of minutes.
SIZES: dict[str, dict[str, Any]] = {
    "cuda": {
        "dtype": torch.bfloat16,
        "head_dims": (64, 128),
        "seq": 4096,
        "heads": 8,
        "window": 512,
        "bigbird_block": 64,
        "train_seq": 512,
        "train_model": ["model.d_model=256", "model.n_heads=4", "model.n_layers=4"],
        # (backend, ZeRO stage, activation checkpointing)
        "runs": [
            ("flex", 0, False),
            ("flex", 1, False),
            ("blocksparse", 0, True),
            ("blocksparse", 1, True),
        ],
        "speed_lengths": (8192, 16384, 32768, 65536),
    },
    "cpu": {
        "dtype": torch.float32,
        "head_dims": (16,),
        "seq": 384,
        "heads": 4,
        "window": 64,
        "bigbird_block": 32,
        "train_seq": 64,
        "train_model": [],  # the tiny preset: d_model 64, 4 heads of 16
        "runs": [("blocksparse", 0, True)],
        "speed_lengths": (512,),
    },
}


class Check:
    """The JSON being built: one entry per step, written out after each."""

    def __init__(self, out: Path, device: str) -> None:
        self.out, self.device = out, device
        self.record: dict[str, Any] = {"device": device, "started": time.time(), "steps": {}}
        self.failed: list[str] = []

    def step(self, name: str, fn: Any, *args: Any) -> Any:
        print(f"gpu_check: {name}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            result = fn(*args)
            entry = {"ok": True, **result}
        except Exception as exc:  # a failed step is a finding: record it, go on
            result = None
            entry = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:4000]}
            entry["traceback"] = traceback.format_exc()[-4000:]
            self.failed.append(name)
        entry["seconds"] = round(time.perf_counter() - start, 2)
        self.record["steps"][name] = entry
        self.write()
        return result

    def write(self) -> None:
        self.record["failed"] = self.failed
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.record, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------- 1. env


def env(device: torch.device) -> dict[str, Any]:
    import deepspeed
    import ray

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "deepspeed": deepspeed.__version__,
        "ray": ray.__version__,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    if device.type == "cuda":
        out["capability"] = list(torch.cuda.get_device_capability(device))
        out["bf16_supported"] = torch.cuda.is_bf16_supported()
        out["memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError as exc:
        out["triton"] = f"not importable: {exc}"
    report = subprocess.run(
        [str(Path(sys.executable).parent / "ds_report")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    out["ds_report"] = (report.stdout + report.stderr)[-3000:]
    return out


# --------------------------------------------------------------------------- 2-3. kernels


def _patterns(size: dict[str, Any]) -> dict[str, Any]:
    from models.attention import make_pattern

    block = size["bigbird_block"]
    return {
        "sliding_window": make_pattern("sliding_window", causal=True, window=size["window"]),
        "bigbird": make_pattern(
            "bigbird", causal=True, block=block, window=3, global_blocks=[0], random=3
        ),
        "longformer": make_pattern(
            "longformer", causal=True, window=size["window"], global_tokens=[0, [8, 16]]
        ),
    }


def _batch(seq: int, device: torch.device, shift: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two packed rows (documents, then padding in row 1); `shift` moves the boundaries, so
    each step gets a fresh mask of the same shapes."""
    cut = [seq // 3 + shift, seq // 2 + 2 * shift]
    pos = torch.arange(seq)
    row0 = (pos >= cut[0]).long() + (pos >= cut[0] + seq // 4).long()
    row1 = (pos >= cut[1]).long() * 7
    docs = torch.stack([row0, row1]).to(device)
    keep = torch.ones(2, seq, dtype=torch.bool)
    keep[1, cut[1] :] = False
    return docs, keep.to(device)


def _qkv(seq: int, heads: int, dim: int, dtype: torch.dtype, device: torch.device) -> list:
    g = torch.Generator(device="cpu").manual_seed(0)
    return [
        torch.randn(2, heads, seq, dim, generator=g).to(device, dtype).requires_grad_()
        for _ in range(3)
    ]


def _run(backend: Any, q: Any, k: Any, v: Any, geo: Any, backward: bool, fn: Any = None) -> list:
    """The output (padding queries zeroed) and, with `backward`, q/k/v gradients; `fn(q, k,
    v, prepared)` replaces the backend's own attend."""
    prepared = backend.prepare(geo, q.dtype)
    out = backend.attend(q, k, v, prepared, 0.0) if fn is None else fn(q, k, v, prepared)
    rows = geo.key_padding_mask[:, None, :, None].to(out.dtype)  # padding queries: not read
    if not backward:
        return [(out * rows).detach()]
    (out * rows).float().square().sum().backward()
    grads = [t.grad.detach().clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return [(out * rows).detach(), *grads]


def _errors(got: list, want: list) -> list[float]:
    return [float((a.float() - b.float()).abs().max()) for a, b in zip(got, want, strict=True)]


class RecompileCounter(logging.Handler):
    """Counts dynamo's recompile messages (the `recompiles` log artifact)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "Recompiling" in record.getMessage()


def flex(device: torch.device, size: dict[str, Any]) -> dict[str, Any]:
    from torch.nn.attention.flex_attention import flex_attention

    from models.attention.backends import BatchGeometry, make_backend

    cuda = device.type == "cuda"
    compiled = None if cuda else torch.compile(flex_attention, backend="eager", dynamic=False)
    seq, tol = size["seq"], (3e-2 if cuda else 2e-4)
    torch._logging.set_logs(recompiles=True)
    counter = RecompileCounter()
    logging.getLogger("torch._dynamo.guards.__recompiles").addHandler(counter)
    results = {}
    try:
        for dim in size["head_dims"]:
            for name, pattern in _patterns(size).items():
                backend, ref = make_backend("flex", pattern), make_backend("reference", pattern)
                q, k, v = _qkv(seq, size["heads"], dim, size["dtype"], device)

                def call(q, k, v, prepared, backend=backend):
                    if cuda:
                        return backend.attend(q, k, v, prepared, 0.0)
                    return compiled(q.detach(), k.detach(), v.detach(), block_mask=prepared)

                errors, before = [], 0
                for step in range(4):  # the first compiles; 3 more with fresh masks
                    if step == 1:  # (a new pattern recompiles its first step: expected)
                        before = counter.count
                    docs, keep = _batch(seq, device, shift=8 * step)
                    geo = BatchGeometry(seq, seq, key_padding_mask=keep, document_ids=docs)
                    geo.device = device
                    got = _run(backend, q, k, v, geo, cuda, call)
                    want = _run(ref, q, k, v, geo, cuda)
                    errors.append(max(_errors(got, want)))
                results[f"{name}/d{dim}"] = {
                    "max_error": max(errors),
                    "recompiles_after_first": counter.count - before,
                    "backward": cuda,
                }
                if max(errors) > tol:
                    raise AssertionError(f"flex {name} d{dim}: error {max(errors)} > {tol}")
                if counter.count > before:  # a fresh mask of the same shapes must not
                    raise AssertionError(f"flex {name} d{dim}: recompiled for a fresh mask")
    finally:
        torch._logging.set_logs(recompiles=False)
    return {"cases": results, "tolerance": tol}


def blocksparse(device: torch.device, size: dict[str, Any]) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    from models.attention.backends import BatchGeometry, make_backend

    cuda = device.type == "cuda"
    seq, dim, tol = size["seq"], size["head_dims"][0], (3e-2 if cuda else 2e-4)
    results = {}
    for name, pattern in _patterns(size).items():
        backend, ref = make_backend("blocksparse", pattern), make_backend("reference", pattern)
        q, k, v = _qkv(seq, size["heads"], dim, size["dtype"], device)
        docs, keep = _batch(seq, device)
        geo = BatchGeometry(seq, seq, key_padding_mask=keep, document_ids=docs, device=device)
        want = _run(ref, q, k, v, geo, True)
        _run(backend, q, k, v, geo, True)  # warm-up: plans and buffers
        activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
        with profile(activities=[activity]) as prof:
            got = _run(backend, q, k, v, geo, True)
        kernels = [e for e in prof.events() if (e.device_type.name == "CUDA") == cuda and e.name]
        error = max(_errors(got, want))
        results[name] = {"max_error": error, "profiled_events": len(kernels)}
        if error > tol:
            raise AssertionError(f"blocksparse {name}: error {error} > {tol}")
    return {"cases": results, "tolerance": tol, "what": "events: CUDA kernels (CPU ops on CPU)"}


# --------------------------------------------------------------------------- 4-5. runs


def _attnpipe(*args: str, timeout: int = 900) -> dict[str, Any]:
    run = subprocess.run(
        [ATTNPIPE, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )
    if run.returncode != 0:
        raise RuntimeError(f"attnpipe {args[0]} exited {run.returncode}: {run.stderr[-2500:]}")
    return json.loads(run.stdout) if run.stdout.strip().startswith("{") else {}


def _overrides(work: Path, size: dict[str, Any], cuda: bool) -> list[str]:
    return [
        f"storage.work_dir={work}",
        f"data.seq_len={size['train_seq']}",
        "data.tokenizer.vocab_size=512",
        *size["train_model"],
        "training.steps=4",
        "training.global_batch_size=4",
        "training.micro_batch_size=2",  # two micro-batches: accumulation runs
        "training.log_interval=2",
        "training.eval_interval=2",
        "training.eval_batches=2",
        "training.checkpoint_interval=2",
        "training.lr_schedule.warmup_steps=1",
        "training.precision=bf16",
        "resources.num_workers=1",
        f"resources.gpus_per_worker={1 if cuda else 0}",
        "resources.cpus_per_worker=1",
        "tracking.system_metrics=false",
        "tracking.heatmap_tokens=16",
    ]


def train(device: torch.device, size: dict[str, Any], work: Path) -> dict[str, Any]:
    cuda = device.type == "cuda"
    base = _overrides(work, size, cuda)
    runs = {}  # the first run preprocesses (a train job does when its shards are missing)
    for backend, stage, checkpointing in size["runs"]:
        attention = [f"attention.backend={backend}"]
        attention += ["attention.pattern=sliding_window", f"attention.params.window={64}"]
        extra = [*attention, f"deepspeed.zero_stage={stage}"]
        extra.append(f"training.activation_checkpointing={str(checkpointing).lower()}")
        summary = _attnpipe("run", "jobs/decoder-tiny.yaml", *base, *extra)
        metrics = summary["metrics"]
        runs[f"{backend}/zero{stage}"] = {
            "overrides": extra,
            "step": metrics["step"],
            "train_loss": metrics.get("train/loss"),
            "val_loss": metrics.get("val/loss"),
            "memory_gib": metrics.get("train/memory_gib"),
            "tokens_per_s": metrics.get("train/tokens_per_s"),
            "mfu": metrics.get("train/mfu"),
            "run_dir": summary["run_dir"],
        }
        if metrics["step"] != 4 or not math.isfinite(metrics.get("train/loss", math.nan)):
            raise AssertionError(f"{backend} zero{stage}: {metrics}")
    return {"runs": runs, "base_overrides": base}


def resume_export(
    device: torch.device, size: dict[str, Any], work: Path, trained: dict[str, Any]
) -> dict[str, Any]:
    from pipeline.train.checkpoint import latest_complete
    from pipeline.train.flops import DevicePeak

    cuda = device.type == "cuda"
    name, first = next(iter(trained["runs"].items()))
    checkpoints = Path(first["run_dir"])
    checkpoint = latest_complete(checkpoints)
    base = [*trained["base_overrides"], *first["overrides"]]
    resumed = _attnpipe(
        "run", "jobs/decoder-tiny.yaml", *base, "training.steps=6", "--resume-from", str(checkpoint)
    )
    exported = work / "exported"
    _attnpipe("export", str(checkpoint), "--out", str(exported))
    plan = _attnpipe("plan", "jobs/decoder-tiny.yaml", *base, "--format", "json")
    peak = DevicePeak(device, "bf16")
    out = {
        "resumed_from": str(checkpoint),
        "resumed_step": resumed["metrics"]["step"],
        "resumed_at": resumed.get("resumed_at"),
        "exported_files": sorted(p.name for p in exported.iterdir()),
        "peak_flops": peak.flops,
        "peak_measured": peak.measured,
        "plan": {k: plan.get(k) for k in ("gpu_total_bytes", "cpu_total_bytes", "verdict")},
    }
    if cuda and first["memory_gib"] and plan.get("gpu_total_bytes"):
        measured = first["memory_gib"] * 2**30
        out["measured_peak_bytes"] = measured
        out["planned_over_measured"] = plan["gpu_total_bytes"] / measured
    if resumed["metrics"]["step"] != 6:
        raise AssertionError(f"resume of {name} ended at {resumed['metrics']['step']}")
    return out


# --------------------------------------------------------------------------- 6. speed


def _time(fn: Any, repeats: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return times


def speed(device: torch.device, size: dict[str, Any]) -> dict[str, Any]:
    from models.attention import make_pattern

    patterns = {
        "sliding_window": make_pattern("sliding_window", causal=True, window=512),
        "bigbird": make_pattern(
            "bigbird", causal=True, block=64, window=3, global_blocks=[0], random=3
        ),
    }
    records = []
    for seq in size["speed_lengths"]:
        records += _speed_at(device, size["dtype"], seq, patterns)
    return {"records": records, "what": "fwd+bwd on CUDA (forward on CPU), 8 heads of 64"}


def _speed_at(device: torch.device, dtype: torch.dtype, seq: int, patterns: dict) -> list:
    """Flex against SDPA's dense causal kernel (flash on CUDA) at one length: min of 3
    timed runs after a warm-up (the first flex call compiles)."""
    import torch.nn.functional as F

    from models.attention.backends import BatchGeometry, make_backend

    cuda = device.type == "cuda"
    q, k, v = (
        torch.randn(1, 8, seq, 64, device=device, dtype=dtype, requires_grad=cuda) for _ in range(3)
    )

    def timed(attend: Any) -> float:
        def step() -> None:
            out = attend()
            if cuda:
                out.float().sum().backward()

        return min(_time(step, 4, device)[1:])

    sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    records = []
    for name, pattern in patterns.items():
        backend = make_backend("flex", pattern)
        prepared = backend.prepare(BatchGeometry(seq, seq, device=device), q.dtype)
        flex_ms = timed(lambda b=backend, p=prepared: b.attend(q, k, v, p, 0.0))
        records.append(
            {
                "pattern": name,
                "seq_len": seq,
                "flex_ms_min": flex_ms,
                "sdpa_ms_min": sdpa,
                "speedup_vs_sdpa": sdpa / flex_ms,
                "backward": cuda,
            }
        )
    return records


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--out", default="benchmarks/results/gpu_check.json")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --device cpu)", file=sys.stderr)
        return 2
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    size = SIZES[args.device]
    check = Check(Path(args.out), args.device)
    work_ctx = (
        contextlib.nullcontext(args.work)
        if args.work
        else tempfile.TemporaryDirectory(prefix="attnpipe-gpu-check-")
    )
    with work_ctx as work_name:
        work = Path(work_name)
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlflow.db")
        check.step("env", env, device)
        check.step("flex", flex, device, size)
        check.step("blocksparse", blocksparse, device, size)
        trained = check.step("train", train, device, size, work)
        if trained is not None:
            check.step("resume_export", resume_export, device, size, work, trained)
        check.step("speed", speed, device, size)
    check.record["finished"] = time.time()
    check.write()
    print(json.dumps({"failed": check.failed, "out": str(check.out)}))
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
