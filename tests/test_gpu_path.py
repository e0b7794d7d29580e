"""What a CUDA run needs, held in place on the CPU (issue: the GPU path).

- Every tensor that meets a collective is on the worker's device: NCCL takes device tensors
  only. On a CPU the worker's device is the CPU, so the test makes the *default* device
  `meta` while the worker trains, evaluates and reduces its metrics: a tensor built without
  naming the worker's device lands on `meta`, and the wrapped collective refuses it.
- bf16 sums gradients over micro-batches in fp32, and export writes the fp32 master
  weights, not the bf16 model's, for every ZeRO stage (and fp16's at stage 0).
- `attnpipe validate` warns where a spec runs but not as meant on a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import load_spec
from pipeline.data.shards import write_random_documents
from pipeline.runtime import free_port
from pipeline.train.deepspeed_config import deepspeed_config

ROOT = Path(__file__).resolve().parent.parent
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "broadcast",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all_single",
)
# (precision, zero_stage asked for): bf16 at every stage (DeepSpeed's CPU accelerator has
# no fp16: its stage-0 checkpoint is checked on files below)
RUNS = [("bf16", 0), ("bf16", 1), ("bf16", 2), ("bf16", 3), ("fp32", 0)]


def tiny_spec(work_dir: Path, precision: str, stage: int, *overrides: str) -> dict:
    return load_spec(
        ROOT / "jobs" / "decoder-tiny.yaml",
        [
            f"storage.work_dir={work_dir}",
            "data.seq_len=32",
            "model.vocab_size=300",
            "data.tokenizer.vocab_size=300",
            "training.global_batch_size=4",
            "training.micro_batch_size=2",
            "training.lr_schedule.warmup_steps=1",
            "training.eval_batches=2",
            f"training.precision={precision}",
            f"deepspeed.zero_stage={stage}",
            "resources.num_workers=1",
            "tracking.heatmap_tokens=0",
            *overrides,
        ],
    )


def test_bf16_accumulates_gradients_in_fp32_at_every_stage(tmp_path):
    for stage in (0, 1, 2, 3):
        cfg = deepspeed_config(tiny_spec(tmp_path, "bf16", stage), world_size=1)
        assert cfg["gradient_accumulation_steps"] == 2
        assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}, stage
        # DeepSpeed accumulates bf16 in fp32 under ZeRO only: stage 0 runs as 1
        assert cfg["zero_optimization"]["stage"] == max(stage, 1)
    fp32 = deepspeed_config(tiny_spec(tmp_path, "fp32", 0), world_size=1)
    assert "data_types" not in fp32 and fp32["zero_optimization"]["stage"] == 0


def _wrap_collectives(device: torch.device, calls: list[str]) -> None:
    """Replace torch.distributed's collectives by ones that refuse a tensor off `device`."""
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def checked(*args, _original=original, _name=name, **kwargs):
            tensors = []
            for a in (*args, *kwargs.values()):
                if isinstance(a, torch.Tensor):
                    tensors.append(a)
                elif isinstance(a, (list, tuple)):
                    tensors += [t for t in a if isinstance(t, torch.Tensor)]
            for t in tensors:
                if t.device != device:
                    raise AssertionError(f"{_name} got a tensor on {t.device}, not {device}")
            calls.append(_name)
            return _original(*args, **kwargs)

        setattr(dist, name, checked)


def _expected_fp32(engine) -> dict[str, torch.Tensor]:
    """The optimizer's own fp32 master weights, by parameter name, read from the live
    engine (DeepSpeed's safe_get_full_fp32_param; the weights themselves without one)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for n, p in engine.module.named_parameters(remove_duplicate=False):  # tied: both names
        master = safe_get_full_fp32_param(p)
        out[n] = (master if master is not None else p.detach()).float().clone()
    return out


def _checked_group(rank: int, world: int, port: int) -> list[str]:
    """This process as rank `rank` of a gloo group whose collectives refuse tensors off the
    CPU; the names of the collectives called, as they are."""
    from pipeline.train.ops import init_loopback_group

    init_loopback_group(rank, world, port)
    torch.set_num_threads(1)
    calls: list[str] = []
    _wrap_collectives(torch.device("cpu"), calls)
    return calls


def _train_on_meta(w, steps: int) -> dict:
    """`steps` training steps, their metrics and an evaluation, with the default device on
    `meta`: a tensor made without naming the worker's device lands there and fails."""
    torch.set_default_device("meta")
    try:
        losses = [w.train_step(step) for step in range(steps)]
        metrics = w.train_metrics(losses, 1.0)
        metrics.update(w.evaluate())
    finally:
        torch.set_default_device("cpu")
    return metrics


def _rank(rank: int, port: int, tmp: str) -> None:
    import pipeline.train.worker as worker_module
    from pipeline.train.export import consolidated_state

    calls = _checked_group(rank, 1, port)
    results = []
    try:
        for precision, stage in RUNS:
            spec = tiny_spec(Path(tmp), precision, stage).model_dump(mode="json")
            run_dir = Path(tmp) / f"run-{precision}-{stage}"
            w = worker_module.Worker(
                worker_module.WorkerConfig(spec=spec, data_dir=f"{tmp}/data", run_dir=str(run_dir)),
                rank,
                1,
            )
            w.build()
            assert w.device == torch.device("cpu")
            metrics = _train_on_meta(w, 3)
            folder = run_dir / "checkpoint"
            w.write_checkpoint(folder, 3)
            exported = consolidated_state(folder)
            expected = _expected_fp32(w.engine)
            module = {
                n: p.detach().float()
                for n, p in w.engine.module.named_parameters(remove_duplicate=False)
            }
            results.append(
                {
                    "precision": precision,
                    "stage": stage,
                    "optimizer": type(w.engine.optimizer).__name__,
                    "ds_stage": w.engine.zero_optimization_stage(),
                    "param_dtype": str(next(w.engine.module.parameters()).dtype),
                    "metrics": metrics,
                    "names": sorted(set(exported) ^ set(expected)),
                    "equal_master": all(torch.equal(exported[n], expected[n]) for n in expected),
                    "equal_module": all(torch.equal(exported[n], module[n]) for n in module),
                    "all_fp32": all(v.dtype == torch.float32 for v in exported.values()),
                }
            )
            del w
    finally:
        Path(tmp, "results.json").write_text(json.dumps({"runs": results, "calls": calls}))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gpu_path_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-path")
    write_random_documents(tmp / "data", seq_len=32, vocab=300, samples=64)
    mp.spawn(_rank, args=(free_port(), str(tmp)), nprocs=1, join=True)
    return json.loads((tmp / "results.json").read_text())


def test_every_collective_of_the_worker_takes_tensors_on_its_device(gpu_path_runs):
    runs = {(r["precision"], r["stage"]): r for r in gpu_path_runs["runs"]}
    assert sorted(runs) == sorted(RUNS)  # every run trained, evaluated and logged
    # train_metrics and evaluate reduce once each per run, DeepSpeed itself more
    assert gpu_path_runs["calls"].count("all_reduce") >= 2 * len(RUNS)
    for r in runs.values():
        assert r["metrics"]["train/loss"] > 0 and r["metrics"]["val/loss"] > 0
    # every stage logs a gradient norm, ZeRO-0's plain torch optimizer included; bf16 and fp32
    # see nearly the same gradients
    norms = {k: r["metrics"]["train/grad_norm"] for k, r in runs.items()}
    assert all(n > 0 for n in norms.values()), norms
    assert abs(norms["fp32", 0] - norms["bf16", 2]) < 0.01 * norms["fp32", 0], norms


def _sp_rank(rank: int, port: int, tmp: str) -> None:
    """One of two sequence-parallel ranks (P=2, the fused loss in chunks) training bf16 at
    ZeRO-2 and ZeRO-3 with the default device on `meta`."""
    import pipeline.train.worker as worker_module

    calls = _checked_group(rank, 2, port)
    results = []
    try:
        for stage in (2, 3):
            spec = tiny_spec(
                Path(tmp),
                "bf16",
                stage,
                "resources.num_workers=2",
                "resources.sequence_parallel=2",
                "data.seq_len=64",
                "training.loss_chunk_tokens=24",
            ).model_dump(mode="json")
            run_dir = Path(tmp) / f"sp-{stage}"
            config = worker_module.WorkerConfig(
                spec=spec, data_dir=f"{tmp}/data", run_dir=str(run_dir)
            )
            w = worker_module.Worker(config, rank, 2)
            w.build()
            results.append({"stage": stage, "metrics": _train_on_meta(w, 2)})
            del w
    finally:
        Path(tmp, f"sp-{rank}.json").write_text(json.dumps({"runs": results, "calls": calls}))
        dist.destroy_process_group()


def test_sequence_parallel_collectives_take_tensors_on_the_device(tmp_path):
    """The all-to-alls of sequence parallelism, and every other collective of a P=2 group at
    ZeRO-2 and ZeRO-3 in bf16, get tensors on the worker's device, as NCCL requires."""
    write_random_documents(tmp_path / "data", seq_len=64, vocab=300, samples=64)
    mp.spawn(_sp_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        record = json.loads((tmp_path / f"sp-{rank}.json").read_text())
        assert [r["stage"] for r in record["runs"]] == [2, 3]
        assert "all_to_all_single" in record["calls"]
        for r in record["runs"]:
            assert r["metrics"]["train/loss"] > 0 and r["metrics"]["val/loss"] > 0
            assert r["metrics"]["train/grad_norm"] > 0


def test_bf16_runs_deepspeeds_fp32_accumulating_optimizers(gpu_path_runs):
    runs = {(r["precision"], r["stage"]): r for r in gpu_path_runs["runs"]}
    assert runs["bf16", 0]["optimizer"] == "BF16_Optimizer" and runs["bf16", 0]["ds_stage"] == 1
    assert runs["bf16", 1]["optimizer"] == "BF16_Optimizer"
    assert runs["bf16", 2]["optimizer"] == "DeepSpeedZeroOptimizer"
    for stage in (0, 1, 2, 3):
        assert runs["bf16", stage]["param_dtype"] == "torch.bfloat16"


@pytest.mark.parametrize("run", RUNS, ids=[f"{p}-zero{s}" for p, s in RUNS])
def test_export_writes_the_fp32_master_weights(gpu_path_runs, run):
    r = next(x for x in gpu_path_runs["runs"] if (x["precision"], x["stage"]) == run)
    assert r["names"] == [] and r["all_fp32"]
    assert r["equal_master"], "export differs from the optimizer's fp32 master weights"
    if run[0] != "fp32":  # the masters hold bits the 16-bit model weights do not
        assert not r["equal_module"]


def test_export_of_fp16_zero0_takes_the_optimizers_fp32_groups(tmp_path):
    """fp16 at ZeRO 0 (DeepSpeed's FP16 optimizers) saves fp16 weights in `module` and the
    fp32 masters as `optimizer.fp32_groups`, one list per parameter group, in the order the
    worker records in meta.json; DeepSpeed's CPU accelerator has no fp16, so the files are
    written here in that layout."""
    from pipeline.train.checkpoint import DS_TAG, write_meta
    from pipeline.train.export import consolidated_state

    masters = {
        "w": torch.tensor([[1.0001, 2.0002]], dtype=torch.float32),
        "b": torch.tensor([0.30001], dtype=torch.float32),
        "v": torch.tensor([[4.0004], [5.0005]], dtype=torch.float32),
    }
    groups = [["w", "v"], ["b"]]
    (tmp_path / DS_TAG).mkdir()
    torch.save(
        {
            "module": {k: v.half() for k, v in masters.items()},
            "optimizer": {"fp32_groups": [[masters[n].flatten() for n in g] for g in groups]},
        },
        tmp_path / DS_TAG / "mp_rank_00_model_states.pt",
    )
    write_meta(tmp_path, {"zero_stage": 0, "world_size": 1, "param_groups": groups})
    state = consolidated_state(tmp_path)
    assert sorted(state) == sorted(masters)
    for name, value in masters.items():
        assert torch.equal(state[name], value), name
    assert not torch.equal(masters["w"].half().float(), masters["w"])  # fp16 would differ


def test_validate_warns_of_blocksparse_on_gpus_and_bf16_at_stage_0(tmp_path):
    from pipeline.config import spec_warnings

    gpu = ["resources.gpus_per_worker=1", "attention.pattern=sliding_window"]
    gpu += ["attention.params.window=16"]
    cmd = [sys.executable, "-m", "pipeline.cli", "validate", "jobs/decoder-tiny.yaml", *gpu]
    run = subprocess.run(
        [*cmd, "attention.backend=blocksparse"], capture_output=True, text=True, cwd=ROOT
    )
    assert run.returncode == 0 and run.stdout.startswith("job:")  # the YAML stays clean
    assert run.stderr.splitlines() == [
        "attnpipe: warning: attention.backend: blocksparse on GPUs launches about 20 small "
        "kernels per (batch, head, chunk, layer) and upcasts bf16 to fp32; 'flex' "
        "(FlexAttention, compiled) is the training backend on CUDA"
    ]
    assert spec_warnings(tiny_spec(tmp_path, "fp32", 0)) == []  # CPU, fp32: nothing to say
    bf16 = spec_warnings(tiny_spec(tmp_path, "bf16", 0))
    assert len(bf16) == 1 and bf16[0].startswith("deepspeed.zero_stage: 0 with bf16 runs")
    assert spec_warnings(tiny_spec(tmp_path, "bf16", 2)) == []
