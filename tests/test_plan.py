"""The memory planner: ZeRO and activation formulas against hand-computed numbers, for the
optimizer DeepSpeed builds from attnpipe's config; the per-element and per-parameter figures
measured on this CPU (the loss's logits, blocksparse's fp32 q/k/v, DeepSpeed's optimizer
step); fit verdicts for a 7B model, sparse attention, and `attnpipe plan` as a user runs it."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from models import count_params
from pipeline.config import load_spec
from pipeline.plan import (
    CPU_FRAMEWORK_OVERHEAD,
    CPU_HEAP_FACTOR,
    FRAMEWORK_OVERHEAD,
    GPUS,
    HELD,
    STEP,
    TRAIN,
    GiB,
    OptimizerPath,
    PlanError,
    Stack,
    Workload,
    activation_lines,
    estimate,
    find_gpu,
    gpu_total,
    headline,
    host_total,
    human,
    loss_bytes,
    model_state_lines,
    optimizer_path,
    peak,
    plan_job,
    predicted_peak_bytes,
)

ROOT = Path(__file__).resolve().parent.parent
ATTNPIPE = Path(sys.executable).parent / "attnpipe"  # the installed console script
P = 1_000_000  # parameters of the hand-computed workloads


def workload(**changes) -> Workload:
    """A small decoder: 2 layers, s=1024, b=2, h=64, a=4, V=512."""
    base = Workload(
        params=P,
        largest_module=10_000,
        d_model=64,
        n_heads=4,
        vocab_size=512,
        stacks=(Stack("decoder", 2, 1024, 1024.0),),
        logits_len=1024,
        precision="bf16",
        zero_stage=0,
        offload_optimizer=False,
        offload_params=False,
        world_size=8,
        micro_batch=2,
        global_batch=16,
        checkpointing=False,
    )
    return replace(base, **changes)


def states(w: Workload) -> dict[str, tuple[int, int]]:
    return {line.component: (line.gpu, line.cpu) for line in model_state_lines(w)}


def phases(lines) -> dict[str, str]:
    return {line.component: line.phase for line in lines}


def gpu_bytes(w: Workload) -> int:
    """The always-held model states (the step's temporaries left out)."""
    return sum(line.gpu for line in model_state_lines(w) if line.phase == HELD)


# bf16 as attnpipe's DeepSpeed config runs it: fp32 gradient accumulation, and stage 0 as 1
BF16_RUNS = tuple(
    ((stage, opt, par), (max(stage, 1), "fp32"))
    for stage, opt, par in [(0, False, False), (1, False, False), (1, True, False)]
    + [(s, o, False) for s in (2, 3) for o in (False, True)]
    + [(3, False, True), (3, True, True)]
)


# --------------------------------------------------------------------------- model states


def test_zero0_fp32_is_16_bytes_per_param_and_adams_temporary_at_the_step():
    w = workload(precision="fp32", zero_stage=0)
    assert states(w) == {
        "parameters": (4 * P, 0),
        "gradients": (4 * P, 0),
        "optimizer states": (8 * P, 0),  # Adam m, v; the weights are the fp32 master
        # torch AdamW (foreach): sqrt(v) of a whole param group; no fp32 copy of the grads
        "Adam sqrt(v)": (4 * P, 0),
    }
    assert gpu_bytes(w) == 16 * P
    assert phases(model_state_lines(w))["Adam sqrt(v)"] == STEP
    assert optimizer_path(w) == OptimizerPath(0, "fp32", "torch AdamW")


def test_fp16_zero0_copies_every_gradient_to_fp32_for_the_step():
    w = workload(precision="fp16", zero_stage=0)
    assert optimizer_path(w) == OptimizerPath(0, "fp16", "FP16_UnfusedOptimizer")
    assert states(w) == {
        "parameters": (2 * P, 0),
        "gradients": (2 * P, 0),
        "optimizer states": (12 * P, 0),
        "fp32 gradients": (4 * P, 0),  # fp32_param.grad = fp16_param.grad.to(fp32)
        "Adam sqrt(v)": (4 * P, 0),
    }
    assert {c for c, p in phases(model_state_lines(w)).items() if p == STEP} == {
        "fp32 gradients",
        "Adam sqrt(v)",
    }


def test_bf16_zero0_runs_bf16_optimizer_with_bf16_and_fp32_gradients():
    w = workload(zero_stage=0, world_size=8, deepspeed_runs=BF16_RUNS)
    assert optimizer_path(w) == OptimizerPath(1, "fp32", "BF16_Optimizer")
    assert states(w) == {
        "parameters": (2 * P, 0),
        "gradients": ((2 + 4) * P, 0),  # bf16 grads and a whole fp32 accumulation buffer
        "optimizer states": (12 * P // 8, 0),  # partitioned, as ZeRO-1
        "Adam sqrt(v)": (4 * P // 8, 0),  # the fp32 grad partition is a view: no copy
    }
    assert states(replace(w, zero_stage=1)) == states(w)


def test_zero1_partitions_the_optimizer_states():
    w = workload(precision="fp16", zero_stage=1, world_size=4)
    assert gpu_bytes(w) == 2 * P + 2 * P + 12 * P // 4
    assert states(w)["fp32 gradients"] == (4 * P // 4, 0)  # flat fp32 copy of the partition


def test_zero2_16_bit_accumulation_over_8_is_2_plus_14_over_8_bytes_per_param():
    w = workload(zero_stage=2, world_size=8)  # bf16 gradients accumulated in bf16
    assert gpu_bytes(w) == 2 * P + (2 + 12) * P // 8
    assert states(w)["fp32 gradients"] == (4 * P // 8, 0)
    assert states(w)["Adam sqrt(v)"] == (4 * P // 8, 0)


def test_zero2_fp32_accumulation_holds_an_fp32_partition_and_copies_nothing():
    w = workload(zero_stage=2, world_size=8, deepspeed_runs=BF16_RUNS)
    assert optimizer_path(w) == OptimizerPath(2, "fp32", "DeepSpeedZeroOptimizer")
    assert states(w) == {
        "parameters": (2 * P, 0),
        "gradients": (4 * P // 8, 0),  # the compact fp32 partition buffer
        "optimizer states": (12 * P // 8, 0),
        "Adam sqrt(v)": (4 * P // 8, 0),
    }


def test_fp32_zero2_copies_its_gradient_partition_for_the_step_too():
    w = workload(precision="fp32", zero_stage=2, world_size=8)
    assert states(w) == {
        "parameters": (4 * P, 0),
        "gradients": (4 * P // 8, 0),
        "optimizer states": (8 * P // 8, 0),  # the master is the model's own partition
        "fp32 gradients": (4 * P // 8, 0),  # flatten() makes a new tensor, fp32 or not
        "Adam sqrt(v)": (4 * P // 8, 0),
    }


def test_zero3_partitions_everything_and_gathers_one_module():
    w = workload(zero_stage=3, world_size=8, deepspeed_runs=BF16_RUNS)
    s = states(w)
    assert [s[k][0] for k in ("parameters", "gradients", "optimizer states")] == [
        2 * P // 8,
        4 * P // 8,  # fp32 gradient partition
        12 * P // 8,
    ]
    assert s["gathered (ZeRO-3)"] == ((2 + 2) * w.largest_module, 0)
    assert phases(model_state_lines(w))["gathered (ZeRO-3)"] == TRAIN
    # flatten(partition).to(fp32) is a new tensor at ZeRO-3, whatever the dtypes
    assert s["fp32 gradients"] == s["Adam sqrt(v)"] == (4 * P // 8, 0)


def test_zero3_steps_sub_groups_of_at_most_a_billion_parameters():
    big = 20_000_000_000  # 2.5e9 per rank: three sub-groups, stepped one at a time
    s = states(workload(params=big, zero_stage=3, world_size=8, deepspeed_runs=BF16_RUNS))
    assert s["fp32 gradients"] == s["Adam sqrt(v)"] == (4 * 1_000_000_000, 0)
    assert s["optimizer states"] == (12 * big // 8, 0)


def test_offload_moves_optimizer_and_gradient_partitions_to_the_cpu():
    s = states(workload(zero_stage=2, world_size=8, offload_optimizer=True))
    assert s == {
        "parameters": (2 * P, 0),
        "gradients": (0, 4 * P // 8),  # fp32 partition for CPU Adam
        "optimizer states": (0, 12 * P // 8),
        # no GPU step temporaries: CPU Adam steps in host memory
    }
    # ZeRO-1 keeps its whole gradients on the GPU, and CPU Adam's fp32 partition on the host
    s1 = states(workload(zero_stage=1, offload_optimizer=True, deepspeed_runs=BF16_RUNS))
    assert s1["gradients"] == (4 * P, 4 * P // 8)  # .grad_accum in fp32, whole
    both = states(workload(zero_stage=3, offload_optimizer=True, offload_params=True))
    assert both["parameters"] == (0, 2 * P // 8)


# --------------------------------------------------------------------------- activations

S, B, H, A, LAYERS, V = 1024, 2, 64, 4, 2, 512  # the workload() decoder


def test_activations_follow_korthikanti_et_al():
    lines = {line.component: line.gpu for line in activation_lines(workload())}
    assert lines["activations"] == LAYERS * S * B * H * 34
    # sdpa stores no scores: only the fp32 log-sum-exp of each query and head
    assert lines["attention scores"] == LAYERS * 4 * A * S * B
    # the fused loss: bf16 logits and their fp32 log-softmax (2 + 4 B per logit), the hidden
    # states' gradient (bf16) and the head's (fp32)
    assert lines["logits"] == S * B * V * 6 + S * B * H * 2 + V * H * 4
    assert lines["framework"] == FRAMEWORK_OVERHEAD == GiB
    assert "fp32 q, k, v" not in lines  # sdpa keeps q, k, v in the model's dtype
    assert "attention mask" not in lines  # no documents, no ALiBi: SDPA's own causal mask
    assert set(phases(activation_lines(workload())).values()) == {TRAIN, HELD}

    fp32 = {line.component: line.gpu for line in activation_lines(workload(precision="fp32"))}
    assert fp32["activations"] == 2 * lines["activations"]
    assert fp32["attention scores"] == lines["attention scores"]  # fp32 either way
    assert fp32["logits"] == S * B * V * 8 + S * B * H * 4 + V * H * 4  # fp32 logits: 4 + 4


def test_blocksparse_keeps_fp32_copies_of_q_k_v():
    lines = {line.component: line.gpu for line in activation_lines(workload(fp32_qkv=True))}
    # per layer: q (s*b*h), k and v (s*b*kv each) at 4 B instead of the paper's 2
    assert lines["fp32 q, k, v"] == LAYERS * 2 * S * B * (H + 2 * H)
    gqa = {
        line.component: line.gpu
        for line in activation_lines(workload(fp32_qkv=True, kv_dim=16))  # 1 kv head of 16
    }
    assert gqa["fp32 q, k, v"] == LAYERS * 2 * S * B * (64 + 2 * 16)
    fp32 = activation_lines(workload(fp32_qkv=True, precision="fp32"))
    assert "fp32 q, k, v" not in {line.component for line in fp32}  # nothing upcast
    one = {
        line.component: line.gpu
        for line in activation_lines(workload(fp32_qkv=True, checkpointing=True))
    }
    assert one["fp32 q, k, v"] == 2 * S * B * (H + 2 * H)  # the layer being recomputed


def test_checkpointing_keeps_layer_inputs_and_one_full_layer():
    lines = {line.component: line.gpu for line in activation_lines(workload(checkpointing=True))}
    assert lines["activations"] == LAYERS * 2 * S * B * H + 34 * S * B * H
    assert lines["attention scores"] == 4 * A * S * B  # the recomputed layer's log-sum-exp
    stored = workload(checkpointing=True, backend="reference")
    one = {line.component: line.gpu for line in activation_lines(stored)}
    assert one["attention scores"] == 6 * A * S * S * B  # one layer's softmax, bf16


def test_the_peak_is_what_is_held_plus_the_larger_phase():
    # bf16 ZeRO-2 over 8 with bf16 accumulation: activations outweigh the step
    w = workload(zero_stage=2, world_size=8)
    held = 2 * P + 2 * P // 8 + 12 * P // 8 + GiB
    train = LAYERS * S * B * H * 34 + LAYERS * 4 * A * S * B + loss_bytes(S * B, S * B, V, H, 2)
    assert gpu_total(w) == held + train
    # fp16 ZeRO-0 of a 1e9-parameter model with one short sequence: the step outweighs them
    big = workload(
        params=10**9,
        precision="fp16",
        zero_stage=0,
        micro_batch=1,
        stacks=(Stack("decoder", 2, 64, 64.0),),
        logits_len=64,
    )
    held = (2 + 2 + 12) * 10**9 + GiB
    step = (4 + 4) * 10**9  # fp32 gradients + AdamW's sqrt(v)
    assert gpu_total(big) == held + step


def test_workers_sharing_a_gpu_add_up():
    one, two = workload(), workload(workers_per_gpu=2)
    assert gpu_total(two) == 2 * gpu_total(one)
    assert [line.gpu for line in estimate(two)] == [2 * line.gpu for line in estimate(one)]


# --------------------------------------------------------------------------- long sequences


def by_component(w: Workload) -> dict[str, int]:
    return {line.component: line.gpu for line in estimate(w)}


def detail(w: Workload, component: str) -> str:
    return next(line.detail for line in estimate(w) if line.component == component)


def test_sequence_parallel_divides_activations_scores_and_logits_per_rank():
    one, two = by_component(workload()), by_component(workload(seq_parallel=2))
    # each rank holds s/P tokens of every sample; its attention sees all s for a/P heads
    assert two["activations"] == one["activations"] // 2 == LAYERS * (S // 2) * B * H * 34
    assert two["attention scores"] == one["attention scores"] // 2 == LAYERS * 4 * A * S * B // 2
    assert two["logits"] == loss_bytes((S // 2) * B, (S // 2) * B, V, H, 2)
    assert "s/P" in detail(workload(seq_parallel=2), "activations")
    assert "s/P" in detail(workload(seq_parallel=2), "logits")
    # ZeRO partitions over every rank, sequence-parallel ones included: states unchanged
    assert states(workload(zero_stage=2, seq_parallel=2)) == states(workload(zero_stage=2))
    # blocksparse's fp32 q (s/P tokens, all heads) and k, v (all s, kv/P heads): halved too
    qkv = by_component(workload(fp32_qkv=True, seq_parallel=2))["fp32 q, k, v"]
    assert qkv == LAYERS * 2 * B * ((S // 2) * H + 2 * S * (H // 2))
    # a dense mask of packed documents covers the whole sequence on every rank
    docs = by_component(workload(doc_mask=True, seq_parallel=2))["attention mask"]
    assert docs == by_component(workload(doc_mask=True))["attention mask"] == B * S * S * 2


def test_loss_chunk_tokens_shrink_the_logits_line_to_one_chunk():
    base, chunked = by_component(workload()), by_component(workload(loss_chunk=256))
    assert chunked["logits"] == loss_bytes(S * B, 256, V, H, 2)  # one chunk's buffers
    assert "C=256" in detail(workload(loss_chunk=256), "logits")
    # nothing else changes: the hidden states the head reads are activations already
    assert {k: v for k, v in chunked.items() if k != "logits"} == {
        k: v for k, v in base.items() if k != "logits"
    }
    # chunks of the flattened (b, s) tokens; a chunk of them all is the whole, in one piece
    assert by_component(workload(loss_chunk=S * B))["logits"] == base["logits"]
    per_rank = by_component(workload(loss_chunk=S, seq_parallel=2))["logits"]
    assert per_rank == loss_bytes(S // 2 * B, S // 2 * B, V, H, 2)  # one chunk holds them


def test_mlp_chunk_tokens_keep_the_mlps_input_and_one_tile():
    t = 128
    tiled = by_component(workload(mlp_chunk=t))
    # per layer: the attention block 11 and its norm 2, and the tiled MLP's input 2 instead
    # of its 19 and its norm's 2; plus one tile's 19*T*b*h while it is recomputed
    assert tiled["activations"] == LAYERS * 15 * S * B * H + 19 * t * B * H
    assert "tiled MLP" in detail(workload(mlp_chunk=t), "activations")
    checkpointed = by_component(workload(mlp_chunk=t, checkpointing=True))
    assert checkpointed["activations"] == LAYERS * 2 * S * B * H + 15 * S * B * H + 19 * t * B * H
    fp32 = by_component(workload(mlp_chunk=t, precision="fp32"))
    assert fp32["activations"] == 2 * tiled["activations"]
    # a tile the length of the sequence runs the MLP in one piece
    assert by_component(workload(mlp_chunk=S))["activations"] == LAYERS * 34 * S * B * H
    # per rank: tiles of the rank's s/P tokens
    sp = by_component(workload(mlp_chunk=t, seq_parallel=2))
    assert sp["activations"] == LAYERS * 15 * (S // 2) * B * H + 19 * t * B * H


def long_gpt2(seq_len: int, *overrides: str):
    return load_spec(
        None,
        [
            "model.preset=gpt2-small",
            f"model.max_seq_len={seq_len}",
            f"data.seq_len={seq_len}",
            "training.precision=bf16",
            "training.micro_batch_size=1",
            "training.global_batch_size=8",
            "training.document_masking=false",
            "resources.num_workers=8",
            "resources.gpus_per_worker=1",
            "resources.gpu_type=H100-80GB",
            "deepspeed.zero_stage=2",
            *overrides,
        ],
    )


def test_long_sequences_are_offered_loss_chunks_mlp_tiles_and_sequence_parallelism():
    plan = plan_job(long_gpt2(196_608))
    assert plan.fits is False
    offered = {s.overrides[0].split("=")[0] for s in plan.suggestions}
    assert {"training.loss_chunk_tokens", "resources.sequence_parallel"} <= offered
    for s in plan.suggestions:  # each checked by planning the spec with its overrides
        fixed = plan_job(long_gpt2(196_608, *s.overrides))
        assert fixed.fits and fixed.gpu_total == s.gpu_total
    # sequence parallelism only where the workers allow it: P divides them (and the heads)
    lone = plan_job(long_gpt2(131_072, "resources.num_workers=1", "training.global_batch_size=1"))
    assert not any("sequence_parallel" in o for s in lone.suggestions for o in s.overrides)
    # MLP tiles: one worker whose loss runs in chunks already
    chunked = ("resources.num_workers=1", "training.global_batch_size=1")
    tight = plan_job(long_gpt2(262_144, *chunked, "training.loss_chunk_tokens=1024"))
    tiles = [s for s in tight.suggestions if s.overrides == ("training.mlp_chunk_tokens=8192",)]
    assert tiles and tiles[0].gpu_total <= GPUS["H100-80GB"].memory < tight.gpu_total


# --------------------------------------------------------------------------- a CPU worker


def test_predicted_peak_bytes_of_a_cpu_worker_by_hand():
    spec = load_spec(ROOT / "jobs/decoder-tiny.yaml", ["training.document_masking=false"])
    w = plan_job(spec).workload
    p, s, b, h, a, layers, vocab = w.params, 128, 4, 64, 4, 2, 512
    assert (w.stacks[0].seq_len, w.micro_batch, w.d_model, w.vocab_size) == (s, b, h, vocab)
    # fp32 ZeRO-0 in one process: 451 MiB of torch and DeepSpeed, 16 B/param of states
    held = CPU_FRAMEWORK_OVERHEAD + (4 + 4 + 8) * p
    # fp32 activations, sdpa's log-sum-exp, the logits; glibc's heap holds 1.75x of them
    logits = loss_bytes(s * b, s * b, vocab, h, 4)
    train = layers * 34 * 2 * s * b * h + layers * 4 * a * s * b + logits
    assert abs(predicted_peak_bytes(spec) - (held + CPU_HEAP_FACTOR * train)) <= 1
    # the optimizer step is smaller: AdamW on CPU, sqrt(v) and its quotient per tensor
    assert 8 * w.largest_module < CPU_HEAP_FACTOR * train
    plan = plan_job(spec)
    assert plan.to_json()["cpu_worker_peak_bytes"] == predicted_peak_bytes(spec)
    assert any("as a CPU worker process its peak memory (RSS) is about" in n for n in plan.notes)
    # a GPU spec: the per-GPU peak of the plan
    gpu = load_spec(ROOT / "jobs/decoder-tiny.yaml", ["resources.gpus_per_worker=1"])
    assert predicted_peak_bytes(gpu) == plan_job(gpu).gpu_total
    assert plan_job(gpu).to_json()["cpu_worker_peak_bytes"] is None


def test_a_cpu_workers_heap_spares_mmapped_tensors_and_follows_a_chunked_loss():
    cpu = workload(precision="fp32", device="cpu", world_size=1, global_batch=2)
    lines = by_component(cpu)
    live = lines["activations"] + lines["attention scores"] + lines["logits"]
    assert lines["allocator"] == round((CPU_HEAP_FACTOR - 1) * live)
    assert lines["framework"] == CPU_FRAMEWORK_OVERHEAD
    # logits tensors of 1 GiB or more are mmapped (CPU_WORKER_ENV): no heap over them
    big = replace(
        cpu, vocab_size=2**17, logits_len=2048, stacks=(Stack("decoder", 2, 2048, 2048.0),)
    )
    big_lines = by_component(big)
    assert 2048 * B * 2**17 * 4 >= 2**30
    heap = big_lines["activations"] + big_lines["attention scores"]
    assert big_lines["allocator"] == round((CPU_HEAP_FACTOR - 1) * heap)
    # a chunked loss reuses its two buffers: the heap holds them as any other tensor
    chunked = by_component(replace(cpu, loss_chunk=64))
    rest = chunked["activations"] + chunked["attention scores"]
    assert chunked["logits"] == loss_bytes(S * B, 64, V, H, 4)
    expected = (CPU_HEAP_FACTOR - 1) * (rest + chunked["logits"])
    assert abs(chunked["allocator"] - expected) <= 1
    # glibc's defaults map every tensor above 32 MiB: a long sequence's activations (a rank's
    # (s/P, b, h) slice of 64 MiB) and its loss buffers get no heap; short ones keep theirs
    long = replace(cpu, stacks=(Stack("decoder", 2, 2**17, 512.0),), logits_len=2**17)
    long = replace(long, seq_parallel=2, micro_batch=1, d_model=256, loss_chunk=2**15)
    assert 2**16 * 256 * 4 > 32 * 2**20
    default = by_component(replace(long, worker_malloc=False))
    assert default["allocator"] == round((CPU_HEAP_FACTOR - 1) * default["attention scores"])
    assert by_component(long)["allocator"] > 0  # CPU_WORKER_ENV: below 1 GiB, in the heap
    short = by_component(replace(cpu, worker_malloc=False))
    assert short["allocator"] == by_component(cpu)["allocator"]
    # what a CPU process offloads to itself is in its peak
    offloaded = workload(device="cpu", zero_stage=2, offload_optimizer=True, world_size=1)
    host = host_total(offloaded)
    assert host == peak(estimate(offloaded)) + sum(x.cpu for x in estimate(offloaded))


# --------------------------------------------------------------------------- measured
# The planner's per-element and per-parameter figures, measured on this CPU: a dispatch mode
# counts the bytes of every tensor made inside it from the op that makes it until the last
# tensor on its storage dies, which is what a CUDA caching allocator hands out too.


class LiveBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, list[int]] = {}  # storage address -> [tensors alive, bytes]
        self.live = self.peak = 0

    def _free(self, key: int) -> None:
        entry = self.refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            a.untyped_storage().data_ptr()
            for a in tree_flatten((args, kwargs))[0]
            if isinstance(a, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or not t.untyped_storage().nbytes():
                continue
            key = t.untyped_storage().data_ptr()
            if key in inputs and key not in self.refs:
                continue  # in place on, or a view of, a tensor made before the mode
            if key in self.refs:
                self.refs[key][0] += 1
            else:
                self.refs[key] = [1, t.untyped_storage().nbytes()]
                self.live += self.refs[key][1]
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, key)
        return out

    def settle(self) -> int:
        """Live bytes now, with the peak restarted from here."""
        gc.collect()
        self.peak = self.live
        return self.live


class Logits(torch.nn.Module):
    """Just an embedding and the LM head, whose loss runs as the models' does (models/loss.py,
    in chunks of `chunk_tokens` when set): what remains is the loss on the logits."""

    def __init__(
        self, vocab: int, width: int, dtype: torch.dtype, chunk_tokens: int | None = None
    ) -> None:
        from models.loss import LMHead

        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width, dtype=dtype)
        self.head = LMHead(width, vocab, bias=False, dtype=dtype)
        self.head.chunk_tokens = chunk_tokens

    def forward(self, ids, labels=None, **_):
        return self.head(self.emb(ids), labels)


def measured_loss_bytes(dtype: torch.dtype, chunk_tokens: int | None = None) -> dict[str, int]:
    """Live bytes of the causal-LM loss of a batch of 2 x 256 tokens over a 2,048 vocabulary
    (width 16), as attnpipe's objective runs it: the forward pass's peak, what it leaves for
    backward, and backward's peak."""
    from pipeline.train.objectives import Objective

    b, s, vocab = 2, 256, 2048
    model = Logits(vocab, 16, dtype, chunk_tokens)
    batch = np.stack([np.random.randint(0, vocab, (b, s + 1)), np.ones((b, s + 1))], axis=1)
    objective = Objective("decoder", special_ids={}, document_masking=False)
    with LiveBytes() as mode:
        loss, _ = objective.loss(model, batch.astype(np.uint32))
        forward = mode.peak
        held = mode.settle()
        loss.backward()
    return {"forward": forward, "held": held, "backward": mode.peak}


@pytest.mark.parametrize("chunk", [None, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_fused_loss_peaks_in_forward_at_the_planned_bytes_and_keeps_no_logits(dtype, chunk):
    measured = measured_loss_bytes(dtype, chunk)
    each, tokens, vocab, width = dtype.itemsize, 2 * 256, 2048, 16
    rows = chunk or tokens
    # the planner's logits line (the two buffers, the hidden states' and the head's gradients)
    # beside the embedding's output, the one activation of this model
    planned = loss_bytes(tokens, rows, vocab, width, each) + tokens * width * each
    # + labels, per-row vectors and, in 16-bit, a chunk's weight gradient before it is added
    assert planned <= measured["forward"] <= 1.05 * planned
    # forward leaves the gradients for backward (and the loss), nothing of the logits
    gradients = tokens * width * each + vocab * width * 4
    assert gradients <= measured["held"] <= gradients + 64
    # backward scales those gradients and casts them: less than the logits of one chunk
    assert measured["backward"] - measured["held"] < rows * vocab


def attention_bytes(backend: str, kv_heads: int, s: int = 512, b: int = 2) -> int:
    """Bytes one more bf16 self-attention layer (d_model 128, 4 heads) keeps for backward."""
    from models.attention import make_backend, make_pattern
    from models.attention.backends import BatchGeometry
    from models.config import ModelConfig
    from models.layers import Attention, AttentionBatch

    cfg = ModelConfig(d_model=128, n_heads=4, n_kv_heads=kv_heads, dropout=0.0)
    layer = Attention(cfg, make_backend(backend, make_pattern("dense", causal=True), 64))
    layer = layer.to(torch.bfloat16)
    x = torch.randn(b, s, 128, dtype=torch.bfloat16, requires_grad=True)
    geo = BatchGeometry(q_len=s, kv_len=s, device=x.device)
    batch = AttentionBatch(geo, layer.backend.prepare(geo, x.dtype))
    layer(x, batch)  # what is built once per length and reused is not the layer's
    with LiveBytes() as mode:
        first = layer(x, batch)
        before = mode.settle()
        second = layer(first, batch)  # as the next layer of a stack: what one more layer adds
        held = mode.settle()
        del first, second
    return held - before


@pytest.mark.parametrize("kv_heads", [4, 1])
def test_blocksparse_saves_fp32_q_k_v_for_its_backward(kv_heads):
    s, b, h = 512, 2, 128
    kv = kv_heads * 32
    # its output (the next layer's input) and the output projection's input in bf16, and
    # fp32 q, k, v: no 16-bit copies of q, k, v and no attention output are kept
    assert attention_bytes("blocksparse", kv_heads) == 2 * 2 * s * b * h + 4 * s * b * (h + 2 * kv)


# (precision, deepspeed.zero_stage): DeepSpeed's CPU accelerator has no fp16
STEP_RUNS = [("bf16", 0), ("bf16", 2), ("bf16", 3), ("fp32", 0), ("fp32", 2)]


def _step_bytes(rank: int, port: int, out: str) -> None:
    """Each run's optimizer step, measured: its peak over what it held before it began."""
    import deepspeed

    from pipeline.train.deepspeed_config import deepspeed_config
    from pipeline.train.ops import init_loopback_group
    from pipeline.train.zero import share_master_weights

    init_loopback_group(rank, 1, port)
    torch.set_num_threads(1)
    results = {}
    for precision, stage in STEP_RUNS:
        spec = tiny_spec(precision, stage)
        config = deepspeed_config(spec, world_size=1)
        config["optimizer"]["params"]["foreach"] = True  # PyTorch's default on CUDA
        # every engine.step() an optimizer step (no micro-batch accumulation boundary)
        config["gradient_accumulation_steps"] = 1
        config["train_batch_size"] = config["train_micro_batch_size_per_gpu"]
        config["zero_optimization"]["reduce_bucket_size"] = 2**20  # small buffers on a CPU
        torch.manual_seed(0)
        # one weight-decay group, as a real model's nearly whole first group
        model = torch.nn.Sequential(*(torch.nn.Linear(256, 256, bias=False) for _ in range(8)))
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=config
        )
        share_master_weights(engine.optimizer)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        for _ in range(2):  # the first step creates Adam's m and v
            # counted from before backward, so that what the step frees of it counts too
            with LiveBytes() as mode:
                engine.backward(engine(torch.randn(4, 256, dtype=dtype)).float().sum())
                before = mode.settle()
                engine.step()
        results[f"{precision}-{stage}"] = {
            "step": mode.peak - before,
            "params": sum(p.numel() for p in model.parameters()),
            "optimizer": type(engine.optimizer).__name__,
        }
        del engine
    Path(out).write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


def tiny_spec(precision: str, stage: int):
    return load_spec(
        ROOT / "jobs/decoder-tiny.yaml",
        [f"training.precision={precision}", f"deepspeed.zero_stage={stage}"],
    )


@pytest.fixture(scope="module")
def step_bytes(tmp_path_factory):
    from pipeline.runtime import free_port

    out = tmp_path_factory.mktemp("step") / "step.json"
    mp.spawn(_step_bytes, args=(free_port(), str(out)), nprocs=1, join=True)
    return json.loads(out.read_text())


@pytest.mark.parametrize("run", STEP_RUNS, ids=[f"{p}-zero{s}" for p, s in STEP_RUNS])
def test_the_steps_temporaries_are_what_deepspeed_makes(step_bytes, run):
    precision, stage = run
    measured = step_bytes[f"{precision}-{stage}"]
    w = workload(
        params=measured["params"],
        precision=precision,
        zero_stage=stage,
        world_size=1,
        deepspeed_runs=plan_job(tiny_spec(precision, stage)).workload.deepspeed_runs,
    )
    built = {"AdamW": "torch AdamW"}.get(measured["optimizer"], measured["optimizer"])
    assert optimizer_path(w).wrapper == built
    planned = sum(line.gpu for line in model_state_lines(w) if line.phase == STEP)
    # by hand, bytes per parameter of one rank: AdamW's sqrt(v) 4, plus a flat fp32 copy of
    # the gradients where the optimizer makes one (ZeRO-3; ZeRO-1/2 in fp32)
    per_param = {"bf16-3": 8, "fp32-2": 8}.get(f"{precision}-{stage}", 4)
    assert planned == per_param * measured["params"]
    measured_step, params = measured["step"], measured["params"]
    if (precision, stage) == ("fp32", 2):
        # an upper bound: the step frees gradient views as it goes, and how much of the
        # partition that releases before Adam runs depends on DeepSpeed's buckets
        assert planned - 4 * params <= measured_step <= planned
    else:
        assert abs(measured_step - planned) < 1024  # norms and scales beside


# --------------------------------------------------------------------------- from a spec


def llama(*overrides: str):
    return load_spec(
        None,
        [
            "model.preset=llama-7b",
            "training.precision=bf16",
            "data.seq_len=2048",
            "training.micro_batch_size=1",
            "training.global_batch_size=8",
            "resources.gpus_per_worker=1",
            "resources.gpu_type=H100-80GB",
            *overrides,
        ],
    )


def test_params_are_counted_on_the_built_model():
    spec = load_spec(ROOT / "jobs/decoder-tiny.yaml", ["attention.adaptive_span.max_span=64"])
    plan = plan_job(spec)
    # adaptive spans add one parameter per head and layer: counted because the model is built
    assert plan.workload.params == count_params(spec.model.architecture(), spec.attention)
    assert plan.workload.params > count_params(spec.model.architecture())


LLAMA_P = 6_738_415_616
LLAMA_EMBEDDING = 32_000 * 4096  # the largest module: the embedding (or the untied head)


def test_llama_7b_fits_with_zero3_over_8_workers():
    plan = plan_job(llama("deepspeed.zero_stage=3", "resources.num_workers=8"))
    assert plan.workload.params == LLAMA_P and plan.workload.largest_module == LLAMA_EMBEDDING
    assert plan.fits is True
    assert plan.verdict().startswith("fits on H100-80GB: ")
    # by hand: bf16 ZeRO-3 over 8 accumulating in fp32, s=2048, b=1, h=4096, a=32, 32 layers
    s, h, a, layers, vocab, part = 2048, 4096, 32, 32, 32_000, LLAMA_P // 8
    held = (2 + 4 + 12) * part + GiB  # params, fp32 grads, fp32 master + m + v; framework
    train = (
        (2 + 2) * LLAMA_EMBEDDING  # the gathered module and its gradient
        + layers * 34 * s * h  # activations
        + layers * 4 * a * s  # sdpa stores no scores: the fp32 log-sum-exp per query and head
        + s * s * 2  # the per-batch bf16 mask of packed documents (training.document_masking)
        + loss_bytes(s, s, vocab, h, 2)  # the fused loss
    )
    step = (4 + 4) * part  # a flat fp32 gradient copy and AdamW's sqrt(v), one sub-group
    assert part < 10**9 and train > step
    assert plan.gpu_total == held + train


def test_llama_7b_does_not_fit_with_zero0_on_one_worker_and_suggestions_fit():
    plan = plan_job(llama("deepspeed.zero_stage=0", "resources.num_workers=1"))
    assert plan.fits is False
    # bf16 at stage 0 runs as stage 1 (fp32 accumulation): BF16_Optimizer holds the bf16
    # gradients and an fp32 copy, 2 + (2 + 4) + 12 bytes per parameter over one rank
    lines = {line.component: line.gpu for line in plan.lines}
    assert lines["parameters"] + lines["gradients"] + lines["optimizer states"] == 20 * LLAMA_P
    assert lines["Adam sqrt(v)"] == 4 * LLAMA_P and "fp32 gradients" not in lines
    assert "ZeRO-0 (DeepSpeed runs stage 1) with BF16_Optimizer" in headline(plan)
    assert plan.verdict().startswith("does NOT fit on H100-80GB: needs ")
    assert plan.suggestions
    for s in plan.suggestions:  # each suggestion was checked by re-running the estimate
        assert s.gpu_total <= GPUS["H100-80GB"].memory
        fixed = plan_job(llama("deepspeed.zero_stage=0", "resources.num_workers=1", *s.overrides))
        assert fixed.fits and fixed.gpu_total == s.gpu_total
    # one worker: ZeRO partitions nothing, and stage 3 alone saves only the bf16 gradients
    assert ("deepspeed.zero_stage=3",) not in [s.overrides for s in plan.suggestions]


# what attnpipe's DeepSpeed config makes DeepSpeed 0.19.8 build (tests/test_gpu_path.py
# builds the bf16 and fp32 ones for real): (precision, zero_stage) -> the path
PATHS = {
    ("fp32", 0): OptimizerPath(0, "fp32", "torch AdamW"),
    ("fp32", 2): OptimizerPath(2, "fp32", "DeepSpeedZeroOptimizer"),
    ("fp16", 0): OptimizerPath(0, "fp16", "FP16_UnfusedOptimizer"),
    ("fp16", 1): OptimizerPath(1, "fp16", "DeepSpeedZeroOptimizer"),
    ("bf16", 0): OptimizerPath(1, "fp32", "BF16_Optimizer"),  # bf16 runs stage 0 as 1
    ("bf16", 1): OptimizerPath(1, "fp32", "BF16_Optimizer"),
    ("bf16", 2): OptimizerPath(2, "fp32", "DeepSpeedZeroOptimizer"),
    ("bf16", 3): OptimizerPath(3, "fp32", "DeepSpeedZeroOptimizer_Stage3"),
}


@pytest.mark.parametrize("precision,stage", sorted(PATHS))
def test_a_spec_is_planned_with_the_optimizer_deepspeed_builds_from_its_config(precision, stage):
    spec = load_spec(
        ROOT / "jobs/decoder-tiny.yaml",
        [f"training.precision={precision}", f"deepspeed.zero_stage={stage}"],
    )
    assert optimizer_path(plan_job(spec).workload) == PATHS[precision, stage]


def test_bf16_offload_at_stage_1_is_zero_1_not_bf16_optimizer():
    spec = load_spec(
        ROOT / "jobs/decoder-tiny.yaml",
        ["training.precision=bf16", "deepspeed.zero_stage=1", "deepspeed.offload_optimizer=true"],
    )
    # DeepSpeed's BF16_Optimizer is for stage 1 without offload (engine.py)
    assert optimizer_path(plan_job(spec).workload).wrapper == "DeepSpeedZeroOptimizer"


GPU_NOTE = "'flex' (FlexAttention, compiled) is the training backend on GPUs"


def test_blocksparse_for_a_gpu_says_flex_is_the_gpu_backend():
    gpu = plan_job(
        load_spec(
            ROOT / "jobs/decoder-sparse-tiny.yaml",
            ["resources.gpus_per_worker=1", "training.precision=bf16"],
        )
    )
    (note,) = [n for n in gpu.notes if GPU_NOTE in n]
    assert "backend 'blocksparse'" in note and "small kernels per (batch row, head" in note
    assert "attention.backend=flex" in note and "no fp32 copies of q, k, v" in note
    named = plan_job(
        load_spec(ROOT / "jobs/decoder-sparse-tiny.yaml", ["resources.gpu_type=A100-80GB"])
    )
    assert any(GPU_NOTE in n for n in named.notes)  # a GPU named is a GPU target too
    # a CPU run (no GPUs, no GPU type) is blocksparse's home: nothing to say
    cpu = plan_job(load_spec(ROOT / "jobs/decoder-sparse-tiny.yaml"))
    assert not any(GPU_NOTE in n for n in cpu.notes)
    flex = plan_job(
        load_spec(
            ROOT / "jobs/decoder-sparse-tiny.yaml",
            ["resources.gpus_per_worker=1", "attention.backend=flex"],
        )
    )
    assert not any(GPU_NOTE in n for n in flex.notes)


def test_blocksparse_in_bf16_plans_its_fp32_q_k_v():
    spec = load_spec(
        ROOT / "jobs/decoder-sparse-tiny.yaml",
        ["training.precision=bf16", "resources.gpus_per_worker=1"],
    )
    plan = plan_job(spec)
    m = spec.model.architecture()
    s, b = spec.data.seq_len, spec.training.micro_batch_size
    lines = {line.component: line.gpu for line in plan.lines}
    assert m.kv_heads * m.head_dim == m.d_model
    assert lines["fp32 q, k, v"] == m.n_layers * 2 * s * b * (m.d_model + 2 * m.d_model)
    flex = plan_job(
        spec.model_copy(update={"attention": spec.attention.model_copy(update={"backend": "flex"})})
    )
    assert "fp32 q, k, v" not in {line.component for line in flex.lines}


def test_only_the_reference_backend_stores_scores_and_it_scores_every_key():
    common = ["model.preset=tiny", "model.positional=rope", "data.seq_len=8192"]
    window = ["attention.pattern=sliding_window", "attention.params={window: 256}"]
    off = ["training.document_masking=false"]  # no per-batch mask: the scores alone
    dense = plan_job(load_spec(None, [*common, *off]))
    sparse = plan_job(load_spec(None, [*common, *off, *window, "attention.backend=blocksparse"]))
    flex = plan_job(load_spec(None, [*common, *off, *window, "attention.backend=flex"]))
    reference = plan_job(load_spec(None, [*common, *off, *window, "attention.backend=reference"]))

    def line(plan, component="attention scores"):
        return next((x.gpu for x in plan.lines if x.component == component), None)

    s, a, layers = 8192, 4, 2  # tiny: 2 layers, 4 heads; fp32; micro batch 1 (defaults)
    b = dense.workload.micro_batch
    assert dense.workload.stacks[0].keys_per_query == s
    assert 256 <= sparse.workload.stacks[0].keys_per_query <= 256 + 2 * 64  # window + tiles
    # sdpa and flex recompute the scores from the fp32 log-sum-exp of each query and head
    assert line(dense) == line(flex) == layers * 4 * a * s * b
    assert line(sparse) == 0  # blocksparse recomputes each block's softmax in full
    # reference scores all s keys whatever the pattern, and keeps its fp32 softmax, 4 B each
    assert reference.workload.stacks[0].keys_per_query == s
    assert line(reference) == layers * a * s * s * b * 4
    assert line(reference, "attention mask") == s * s * 4  # its dense mask, once a batch
    assert line(dense, "attention mask") is None
    assert sparse.gpu_total < dense.gpu_total < reference.gpu_total


def test_reference_keeps_6_bytes_a_score_in_bf16_more_with_dropout():
    ref = {x.component: x.gpu for x in activation_lines(workload(backend="reference"))}
    assert ref["attention scores"] == LAYERS * 6 * A * S * S * B  # fp32 softmax + bf16 copy
    drop = workload(backend="reference", dropout=True)
    with_dropout = {x.component: x.gpu for x in activation_lines(drop)}
    # fp32 softmax 4, the dropout's mask 1 and its bf16 output 2 (no separate cast kept)
    assert with_dropout["attention scores"] == LAYERS * 7 * A * S * S * B
    fp32 = workload(backend="reference", precision="fp32", dropout=True)
    assert {x.component: x.gpu for x in activation_lines(fp32)}["attention scores"] == (
        LAYERS * 9 * A * S * S * B
    )


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_the_attention_backends_keep_what_the_planner_counts(backend):
    # measured: one more bf16 attention layer (d_model 128, 4 heads, s 512, b 2) keeps its
    # input and the output projection's input (bf16), q, k and v (bf16), and its scores as
    # the planner counts them: reference its softmax, 6 B a score; sdpa a fp32 log-sum-exp
    s, b, h, a = 512, 2, 128, 4
    one_layer = (Stack("decoder", 1, s, float(s)),)
    w = workload(backend=backend, d_model=h, n_heads=a, micro_batch=b, stacks=one_layer)
    scores = next(x.gpu for x in activation_lines(w) if x.component == "attention scores")
    assert scores == {"reference": 6 * a * s * s * b, "sdpa": 4 * a * s * b}[backend]
    assert attention_bytes(backend, 4) == 2 * 2 * s * b * h + 2 * s * b * 3 * h + scores


def test_encoder_decoder_has_both_stacks_and_cross_attention():
    plan = plan_job(load_spec(ROOT / "jobs/encdec-tiny.yaml"))
    encoder, decoder = plan.workload.stacks
    assert (encoder.name, decoder.name) == ("encoder", "decoder")
    assert decoder.cross_keys == encoder.seq_len and encoder.cross_keys == 0


def test_without_a_gpu_type_fit_is_not_judged():
    plan = plan_job(load_spec(ROOT / "jobs/decoder-tiny.yaml"))
    assert plan.gpu is None and plan.fits is None
    assert "no GPU type given" in plan.verdict()


@pytest.mark.parametrize("name", ["H100-80GB", "h100-80gb", "h100_80gb", "H100 80GB", "h100"])
def test_gpu_names_match_case_insensitively(name):
    assert find_gpu(name).name == "H100-80GB"


def test_unknown_gpu_names_the_field_and_suggests():
    with pytest.raises(PlanError) as exc:
        find_gpu("H100-80G", "jobs/x.yaml")
    message = str(exc.value)
    assert message.startswith("jobs/x.yaml: resources.gpu_type: unknown GPU type 'H100-80G'")
    assert "did you mean 'H100-80GB'" in message and "\n" not in message


def test_human_sizes():
    assert human(0) == "-"
    assert human(512 * 1024**2) == "512.0 MiB"
    assert human(1000 * 1024**2) == "1.0 GiB"
    assert human(int(23.4 * GiB)) == "23.4 GiB"


# --------------------------------------------------------------------------- the command


def attnpipe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ATTNPIPE), *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_cli_plan_prints_the_table_and_the_fit_line():
    result = attnpipe("plan", "jobs/decoder-gpt2-small.yaml", "resources.gpu_type=H100-80GB")
    assert result.returncode == 0, result.stderr
    assert "optimizer states" in result.stdout and "activations" in result.stdout
    assert any(line.startswith("fits on H100-80GB: ") for line in result.stdout.splitlines())


def test_cli_plan_unknown_gpu_exits_2_with_one_line():
    result = attnpipe("plan", "jobs/decoder-gpt2-small.yaml", "resources.gpu_type=H100-80G")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "resources.gpu_type" in lines[0] and "H100-80GB" in lines[0]
    assert "Traceback" not in result.stderr


def test_cli_plan_json_has_every_number():
    result = attnpipe("plan", "jobs/decoder-gpt2-small.yaml", "--format", "json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["params"] == 124_439_808 and plan["world_size"] == 8
    assert plan["deepspeed"] == {
        "stage": 2,
        "grad_accum_dtype": "fp32",
        "optimizer": "DeepSpeedZeroOptimizer",
    }
    # by hand: GPT-2 small, bf16 ZeRO-2 over 8 accumulating in fp32, micro batch 16 x 1,024
    p, s, b, h, a, layers, vocab = 124_439_808, 1024, 16, 768, 12, 12, 50257
    held = 2 * p + (4 + 12) * p // 8 + GiB
    # activations, sdpa's log-sum-exp (no scores stored), the documents' bf16 mask, logits
    logits = loss_bytes(s * b, s * b, vocab, h, 2)
    train = layers * 34 * s * b * h + layers * 4 * a * s * b + b * s * s * 2 + logits
    step = 4 * p // 8  # AdamW's sqrt(v); the fp32 gradient partition exists already
    assert plan["gpu_phase_bytes"] == {
        "always": held,
        "forward/backward": train,
        "optimizer step": step,
    }
    assert plan["gpu_total_bytes"] == held + train
    assert plan["gpu"]["name"] == "H100-80GB" and plan["fits"] is True
    assert 0 < plan["utilization"] < 1
