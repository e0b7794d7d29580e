"""The DeepSpeed config a job's `training` and `deepspeed` nodes describe, and the learning
rate schedule. One function, so `attnpipe validate --format json`, the workers and the docs
all see the same dictionary."""

from __future__ import annotations

import math
from typing import Any

from pipeline.config import JobSpec, ScheduleLRNode


def deepspeed_config(spec: JobSpec, world_size: int | None = None) -> dict[str, Any]:
    """A DeepSpeed config dict for `spec` on `world_size` workers (default:
    resources.num_workers). With sequence parallelism DeepSpeed still sees every worker as a
    data-parallel rank (it averages gradients over all of them: the loss is scaled for it,
    pipeline/train/objectives.py), so its batch counts each group's samples P times."""
    t, ds = spec.training, spec.deepspeed
    world = world_size or spec.resources.num_workers
    per_step = t.micro_batch_size * world
    data_parallel = world // spec.resources.sequence_parallel
    accum = t.global_batch_size // (t.micro_batch_size * data_parallel)
    opt = t.optimizer
    offload_opt = ds.offload_optimizer
    stage = zero_stage(spec)
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if offload_opt:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    config: dict[str, Any] = {
        "train_batch_size": accum * per_step,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": t.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": opt.lr,
                "betas": list(opt.betas),
                "eps": opt.eps,
                "weight_decay": opt.weight_decay,
                # torch.optim.AdamW where the optimizer stays with the model: no JIT-built op;
                # an offloaded optimizer runs DeepSpeed's CPU Adam
                **({} if offload_opt else {"torch_adam": True}),
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,  # attnpipe reports progress itself
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        # Gradients summed over micro-batches (and ranks) in fp32: in bf16, each addition
        # rounds to 8 bits of mantissa, and small late micro-batch gradients vanish.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if offload_opt:
        config["zero_force_ds_cpu_optimizer"] = True
    return config


def zero_stage(spec: JobSpec) -> int:
    """The ZeRO stage DeepSpeed is asked for. bf16 with `zero_stage: 0` runs stage 1:
    DeepSpeed 0.19 accumulates bf16 gradients in fp32 only under ZeRO (its engine refuses
    bf16 with an fp32 accumulation type at stage 0, "unsupported mix of model_dtype and
    grad_accum_dtype"); at stage 1 it runs its BF16_Optimizer, with fp32 master weights and
    fp32 gradients, whose optimizer state is partitioned over the data-parallel ranks."""
    stage = spec.deepspeed.zero_stage
    return max(stage, 1) if spec.training.precision == "bf16" else stage


class LRSchedule:
    """Linear warmup from 0, then cosine, linear or constant decay to min_lr_ratio * lr at the
    last step: the multiplier LambdaLR applies to the base learning rate. A class, not a
    closure, so the scheduler's state dict is plain data."""

    def __init__(self, node: ScheduleLRNode, total_steps: int) -> None:
        self.name, self.warmup = node.name, node.warmup_steps
        self.min_ratio, self.total = node.min_lr_ratio, total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.name == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.name == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * decay
