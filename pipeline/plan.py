"""The memory planner behind `attnpipe plan`: what each GPU holds while a job trains, and
whether that fits the GPU the spec names (`resources.gpu_type`); and, for a CPU job, the peak
host memory (RSS) of one training worker process (`predicted_peak_bytes`).

Model states follow the ZeRO paper's accounting (Rajbhandari et al. 2020, section 3.1),
for the optimizer DeepSpeed 0.19.8 builds from the config the workers get
(pipeline/train/deepspeed_config.py, read as DeepSpeed's engine reads it). With P parameters
and mixed precision (bf16/fp16) training holds 2P bytes of 16-bit parameters, 2P of 16-bit
gradients and 12P of optimizer state (fp32 master weights, Adam's m and v); fp32 training
holds 4P + 4P + 8P (attnpipe's ZeRO shares the fp32 master with the model's own weights,
pipeline/train/zero.py). Over N ranks ZeRO-1 partitions the optimizer state, ZeRO-2 the
gradients too, ZeRO-3 the parameters too (each / N; N counts every worker, sequence-parallel
ranks included, as DeepSpeed partitions over its whole data-parallel world). Gradients are
held in the dtype DeepSpeed accumulates them in: bf16 jobs accumulate in fp32, which
DeepSpeed does at stage 1 and up only, so attnpipe runs bf16 stage 0 as stage 1, where
DeepSpeed's BF16_Optimizer keeps the bf16 gradients and a whole fp32 copy (2P + 4P) beside
partitioned optimizer state; ZeRO-2 and 3 keep this rank's fp32 partition (4P/N). Offloading
the optimizer (ZeRO-Offload) keeps the fp32 partition, m and v in host memory, and an fp32
gradient partition for CPU Adam (ZeRO-1 keeps its whole gradients on the GPU as well);
offloading parameters (ZeRO-3) keeps their partition there too.

The optimizer step adds temporaries the paper leaves out (torch.optim.AdamW):
- AdamW's sqrt(v): on CUDA its foreach step (PyTorch's default there) makes 4 bytes per
  parameter of what one call updates: a param group at stage 0, this rank's partition at
  stages 1-2 (and in BF16_Optimizer), a sub-group of at most 1e9 parameters at stage 3. On
  CPU AdamW steps tensor by tensor (no foreach kernels there): sqrt(v) and its quotient, 8
  bytes per element of the largest tensor it updates (a parameter at stage 0, the flat
  partition or sub-group under ZeRO).
- fp32 gradients made for the step: fp16/bf16 stage 0 (DeepSpeed's FP16_UnfusedOptimizer)
  copies every gradient to fp32 (4P); ZeRO-1/2 copy this rank's partition to a flat fp32
  tensor (4P/N), in fp32 runs too; ZeRO-3 does so per sub-group. Only 16-bit models that
  accumulate in fp32 (BF16_Optimizer, ZeRO-2's compact partition) step on the fp32
  gradients they hold, and fp32 stage 0 on its own .grad.
These exist only during the step, after backward has freed the activations, so the peak is
what is always held plus the larger of the forward/backward and the step transients.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", section 4.1): one layer stores 34*s*b*h bytes in 16-bit (twice that in
fp32), split as the paper splits it: the attention block 11*s*b*h (its input, Q and K, V,
the output projection's input, a dropout mask), the MLP 19*s*b*h (its input, the GeLU's input
and output, a dropout mask) and the two layernorms 4*s*b*h; a decoder's cross-attention adds
its block and norm, 13*s*b*h. (Measured here with tests/test_plan.py's counter, an fp32
layer with dropout 0 keeps 2 x 32*s*b*h: the paper's layer without its two dropout masks.) With
activation checkpointing each layer keeps only its input (2*s*b*h) and one layer at a time
is recomputed in full. A tiled MLP (`training.mlp_chunk_tokens` T: models/layers.py runs the
MLP and its norm in chunks of T positions under checkpoint) keeps only their input, 2*s*b*h,
instead of 19 + 2, so a layer keeps 15*s*b*h, plus one chunk's 19*T*b*h while it is
recomputed.

Attention scores are counted only where a backend keeps them (the paper's 5*a*s^2*b, its
softmax, dropout mask and dropout output, assumes they are all kept):
- `reference` materializes the dense (b, a, s, s) scores whatever the pattern (k = s keys per
  query) and keeps its fp32 softmax (4 B per score), plus the copy in the model's dtype that
  multiplies V (16-bit runs: 2 B), or, with dropout, the dropout's mask and output (1 + 2|4 B);
  measured with tests/test_plan.py's counter.
- adaptive spans score only the keys in the largest span plus ramp, a block of queries at a
  time (k = max_span + ramp + block_size) and keep four fp32 tensors of those scores (16 B;
  14 B in 16-bit runs), plus their soft mask (5 B per score and head, not per sample);
  measured the same way (18.5-19.8 B per score at b = 2, fp32).
- `sdpa` never stores them: its flash and memory-efficient kernels (CUDA) and its fused CPU
  kernel, with or without an attention mask, recompute them in backward from q, k, v, the
  output and the fp32 log-sum-exp of each query and head (4*a*s*b per layer), all that is
  counted. FlexAttention (`flex`) keeps the same.
- `blocksparse` (models/attention/blocksparse.py) saves only q, k and v and recomputes each
  block's softmax in full in backward: no scores and no per-row statistics (nothing to
  count beyond q, k, v). In 16-bit runs it computes in fp32 and saves fp32 copies of q, k and
  v, 2 bytes per element more than the paper's 16-bit ones. Its plan (which key blocks each
  query block meets, masks of partial tiles) is a few MB at 32K tokens and is not counted.
Where SDPA (or `reference`) gets a per-batch dense mask, it is counted once, shared by the
layers: b*s^2 in the model's dtype for packed documents (`training.document_masking`, on a
decoder or encoder), a*s^2 for ALiBi's bias. A k-keys sparse pattern is read from the
pattern's block layout.

The logits cost (the model dtype's bytes + 4) per element, at the end of forward: the LM
head and its loss are one fused function (models/loss.py) that computes the logits into one
buffer, their fp32 log-softmax into another, turns that into the logits' gradient in place
and from it the gradients of the hidden states (s*b*h in the model's dtype, kept until
backward) and of the head's weight; nothing of the logits outlives forward. With
`training.loss_chunk_tokens` C the two buffers hold C tokens, reused chunk after chunk: the
logits line is C*V*(2|4 + 4) bytes, plus the hidden states' gradient.

Sequence parallelism (`resources.sequence_parallel` P, Ulysses): each rank keeps a 1/P slice
of every sample (embeddings, norms, MLPs, the residual stream, the logits and the loss), and
its attention sees the whole sequence for a/P heads: q, k, v, the output and any stored
scores are those of s/P tokens and all heads. So activations, scores and logits per rank
divide by P; a dense mask does not (each rank masks the whole sequence).

A CPU worker (gpus_per_worker 0) is planned with the same lines, in its one process: the
host-side framework (CPU_FRAMEWORK_OVERHEAD, measured) instead of a CUDA context, offloaded
states in the same memory, AdamW's CPU temporaries, and an "allocator" line for glibc's heap:
the peak RSS, `predicted_peak_bytes`. Under the malloc settings CPU workers run with
(pipeline.train.ops.CPU_WORKER_ENV) glibc 2.36 holds more than the live tensors: measured,
1.5-1.9x the forward/backward bytes (CPU_HEAP_FACTOR), and with sequence parallelism one
forward pass's all-to-all buffers on top; tensors of 1 GiB or more are mapped and returned
whole. With glibc's defaults (`worker_malloc=False`) every tensor above 32 MiB is mapped and
returned, and the heap factor applies only to smaller ones. Checked against the measured
ru_maxrss of whole DeepSpeed steps of a 4-layer d256 decoder at 4K-262K tokens (dense,
sliding window, Longformer, BigBird; the chunked loss at an 8K and a 32K vocabulary;
checkpointing and tiled MLP; P=2) in benchmarks/results/long_context.json; outside that
range it is an estimate.
Not counted anywhere: communication buckets, all-to-all buffers on GPUs, allocator
fragmentation on GPUs, the data loader, blocksparse's plan (a few MB).

Symbols: P parameters (or sequence-parallel ranks, where said), N ranks, s sequence length,
b micro batch, h model width, kv key/value width (h without grouped-query attention), a
attention heads, k keys per query, V vocabulary, C loss chunk, T MLP tile.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, replace
from typing import Any

from models.config import AttentionConfig
from pipeline.config import JobSpec
from pipeline.errors import UserError

MiB = 1024**2
GiB = 1024**3
# One per training process: the CUDA context, cuBLAS and NCCL workspaces. Communication
# buckets and allocator fragmentation come on top and are not counted.
FRAMEWORK_OVERHEAD = 1 * GiB
# One CPU training worker process before its model: Python with torch and DeepSpeed imported,
# a gloo group and a tiny DeepSpeed engine (ZeRO 0, fp32, torch_adam) built and stepped
# twice. Its peak RSS (ru_maxrss), measured on the project's 2-core CPU machine (torch 2.13
# CPU, DeepSpeed 0.19.8, Debian 12, glibc 2.36): 473 MB, three runs within 0.1%, with glibc's
# malloc defaults and with CPU_WORKER_ENV alike (torch alone: 230 MB; + deepspeed: 378 MB).
CPU_FRAMEWORK_OVERHEAD = 451 * MiB
# glibc's heap in a CPU worker, which runs with pipeline.train.ops.CPU_WORKER_ENV (nothing
# below 1 GiB is mmapped, nothing is trimmed): its peak RSS over its live tensors. glibc 2.36
# (Debian 12) does not reuse a freed block for an aligned allocation of the same size (it asks
# for size + alignment; glibc 2.38 scans for aligned chunks), and PyTorch allocates every CPU
# tensor aligned, so each step's activations and logits land partly in fresh memory. Measured
# (ru_maxrss of 2 training steps, a 4-layer d256 decoder, fp32, micro batch 1, 4K-32K tokens;
# dense sdpa, sliding window and BigBird blocksparse): the heap held 1.48-1.92x the forward /
# backward bytes, median 1.75; tensors of 1 GiB or more are mmapped and returned whole.
CPU_HEAP_FACTOR = 1.75
# glibc's own mmap threshold rises with the blocks freed, up to DEFAULT_MMAP_THRESHOLD_MAX
# (32 MiB on 64-bit): with its defaults every tensor larger than this is mapped and returned
# whole, so the heap factor applies only below it.
GLIBC_MMAP_THRESHOLD_MAX = 32 * MiB
# DeepSpeed's zero_optimization.sub_group_size default (runtime/zero/config.py), which
# attnpipe's config leaves alone: ZeRO-3 steps its partition in sub-groups of this many
# parameters (a sub-group closes at the first parameter that reaches it).
ZERO3_SUB_GROUP = 1_000_000_000
# When a line's bytes are on the GPU: always, while forward and backward run (activations,
# logits, ZeRO-3's gathered parameters), or during the optimizer step only.
HELD, TRAIN, STEP = "always", "forward/backward", "optimizer step"


class PlanError(UserError):
    """A spec that validates but cannot be planned; one line naming the field."""


# --------------------------------------------------------------------------- GPUs


@dataclass(frozen=True)
class GPU:
    name: str
    memory: int  # bytes: the total nvidia-smi reports, a little below the marketed size


# Keyed by the names users write in resources.gpu_type (matched case-insensitively).
GPUS: dict[str, GPU] = {
    g.name: g
    for g in (
        GPU("H100-80GB", 81_559 * MiB),  # SXM and PCIe
        GPU("H100-94GB", 95_830 * MiB),  # H100 NVL
        GPU("H200", 143_771 * MiB),  # 141 GB
        GPU("A100-80GB", 81_920 * MiB),
        GPU("A100-40GB", 40_960 * MiB),
        GPU("L40S", 46_068 * MiB),
        GPU("L4", 23_034 * MiB),
        GPU("A10G", 23_028 * MiB),
        GPU("V100-32GB", 32_510 * MiB),
        GPU("V100-16GB", 16_160 * MiB),
        GPU("T4", 15_360 * MiB),
        GPU("RTX-4090", 24_564 * MiB),
    )
}
_ALIASES = {
    "H100": "H100-80GB",
    "H100-SXM": "H100-80GB",
    "H100-PCIE": "H100-80GB",
    "H100-NVL": "H100-94GB",
    "H200-141GB": "H200",
    "L4-24GB": "L4",
    "A10G-24GB": "A10G",
    "RTX4090": "RTX-4090",
    "RTX-4090-24GB": "RTX-4090",
}


def _key(name: str) -> str:
    return name.strip().upper().replace("_", "-").replace(" ", "-")


_LOOKUP = {**{_key(n): n for n in GPUS}, **{_key(a): n for a, n in _ALIASES.items()}}


def find_gpu(name: str, source: str = "<spec>") -> GPU:
    """The GPU a user named; PlanError (one line naming resources.gpu_type) if unknown."""
    found = _LOOKUP.get(_key(name))
    if found is not None:
        return GPUS[found]
    close = difflib.get_close_matches(_key(name), list(_LOOKUP), n=3, cutoff=0.6)
    names = list(dict.fromkeys(_LOOKUP[c] for c in close))  # canonical, in order, no repeats
    hint = f" (did you mean {' or '.join(repr(n) for n in names)}?)" if names else ""
    raise PlanError(
        f"{source}: resources.gpu_type: unknown GPU type {name!r}{hint}; known: {', '.join(GPUS)}"
    )


# --------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class Stack:
    """One stack of layers as the activation estimate sees it."""

    name: str
    layers: int
    seq_len: int
    keys_per_query: float  # keys each query scores: s when dense (and for `reference`)
    cross_keys: int = 0  # a decoder's cross-attention: the source length


@dataclass(frozen=True)
class Workload:
    """The numbers the estimate depends on; a suggestion is a `replace` of some of them."""

    params: int
    largest_module: int  # parameters of the biggest module ZeRO-3 gathers at once
    d_model: int
    n_heads: int
    vocab_size: int
    stacks: tuple[Stack, ...]
    logits_len: int
    precision: str
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    world_size: int
    micro_batch: int
    global_batch: int
    checkpointing: bool
    workers_per_gpu: int = 1
    kv_dim: int | None = None  # key/value width (n_kv_heads x head_dim); None: d_model
    fp32_qkv: bool = False  # the attention backend saves fp32 copies of q, k, v (blocksparse)
    backend: str = "sdpa"  # attention.backend: which keeps scores (see `score_kind`)
    adaptive_span: bool = False  # a decoder's self-attention scores through learned spans
    dropout: bool = False  # model.dropout > 0 (what `reference` keeps of its softmax)
    doc_mask: bool = False  # packed documents: a per-batch (b, 1, s, s) mask for sdpa
    alibi: bool = False  # ALiBi: an (a, s, s) bias for sdpa
    seq_parallel: int = 1  # resources.sequence_parallel: ranks sharing each sample
    sp_options: tuple[int, ...] = ()  # sequence_parallel values the spec's workers allow
    loss_chunk: int | None = None  # training.loss_chunk_tokens
    mlp_chunk: int | None = None  # training.mlp_chunk_tokens
    device: str = "cuda"  # "cpu": one CPU worker process (its host memory)
    worker_malloc: bool = True  # a CPU worker's glibc runs with CPU_WORKER_ENV (else defaults)
    # What DeepSpeed runs for each ZeRO setting the planner may try, (zero_stage,
    # offload_optimizer, offload_params) -> (its ZeRO stage, gradient accumulation dtype),
    # read from the config the workers get; a setting not listed runs as written and
    # accumulates in the training precision.
    deepspeed_runs: tuple[tuple[tuple[int, bool, bool], tuple[int, str]], ...] = ()


@dataclass(frozen=True)
class Line:
    component: str
    gpu: int  # bytes on each GPU
    cpu: int  # bytes of host memory per GPU (offloaded states)
    detail: str
    phase: str = HELD  # HELD, TRAIN or STEP: when the GPU bytes exist
    tensor: int = 0  # bytes of its largest single tensor, where one is large (CPU heap model)


def peak(lines: list[Line] | tuple[Line, ...]) -> int:
    """GPU bytes at the peak: what is always held, plus the larger of what forward/backward
    and what the optimizer step add (backward frees the activations before the step)."""
    held = sum(line.gpu for line in lines if line.phase == HELD)
    train = sum(line.gpu for line in lines if line.phase == TRAIN)
    step = sum(line.gpu for line in lines if line.phase == STEP)
    return held + max(train, step)


@dataclass(frozen=True)
class OptimizerPath:
    """How DeepSpeed 0.19.8 runs a job's optimizer, as its engine reads attnpipe's config
    (engine.py `_do_optimizer_sanity_check` and `_configure_optimizer`)."""

    stage: int  # the ZeRO stage DeepSpeed runs
    accum: str  # the dtype gradients accumulate in: "fp32", "bf16" or "fp16"
    wrapper: str  # DeepSpeed's optimizer class around torch.optim.AdamW (or CPU Adam)


def optimizer_path(w: Workload) -> OptimizerPath:
    """The optimizer DeepSpeed builds for a workload; PlanError where DeepSpeed refuses."""
    key = (w.zero_stage, w.offload_optimizer, w.offload_params)
    stage, accum = dict(w.deepspeed_runs).get(key, (w.zero_stage, w.precision))
    if stage == 0:
        if accum != w.precision:
            raise PlanError(
                f"deepspeed: DeepSpeed 0.19 does not accumulate {w.precision} gradients in "
                f"{accum} at ZeRO stage 0 (engine: 'unsupported mix')"
            )
        # fp32: torch AdamW as it is; bf16/fp16: FP16_UnfusedOptimizer (FP16_Optimizer only
        # wraps DeepSpeed's FusedAdam, which attnpipe's config never asks for)
        wrapper = "torch AdamW" if w.precision == "fp32" else "FP16_UnfusedOptimizer"
    elif stage == 1 and w.precision == "bf16" and accum == "fp32" and not w.offload_optimizer:
        wrapper = "BF16_Optimizer"
    else:
        wrapper = "DeepSpeedZeroOptimizer" + ("_Stage3" if stage == 3 else "")
    return OptimizerPath(stage, accum, wrapper)


_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def model_state_lines(w: Workload) -> list[Line]:
    """Parameters, gradients and optimizer state per GPU, by the ZeRO stage DeepSpeed runs and
    offload, and what the optimizer step adds while it runs."""
    path = optimizer_path(w)
    mixed = w.precision != "fp32"
    p_bytes, g_bytes, o_bytes = (2, 2, 12) if mixed else (4, 4, 8)
    a_bytes = _BYTES[path.accum]
    n, stage = w.world_size, path.stage

    def share(bytes_per_param: int, partitioned: bool) -> int:
        return (
            math.ceil(w.params * bytes_per_param / n) if partitioned else w.params * bytes_per_param
        )

    def how(bytes_per_param: int, partitioned: bool) -> str:
        return f"{bytes_per_param} B/param" + (f" / {n}" if partitioned else "")

    params = share(p_bytes, stage >= 3)
    dtype = w.precision
    lines = [
        Line(
            "parameters",
            0 if w.offload_params else params,
            params if w.offload_params else 0,
            f"{dtype}, {how(p_bytes, stage >= 3)}" + (", CPU" if w.offload_params else ""),
        )
    ]
    if w.offload_optimizer:
        # CPU Adam reads an fp32 gradient partition kept in host memory, at every stage
        # (stage_1_and_2.py initialize_optimizer_states keeps it when offloading); ZeRO-1
        # also keeps whole gradients on the GPU, ZeRO-2 and 3 reduce straight into it
        on_gpu = share(a_bytes, False) if stage < 2 else 0
        lines.append(
            Line(
                "gradients",
                on_gpu,
                share(4, True),
                (f"{path.accum}, {how(a_bytes, False)}; " if on_gpu else "")
                + f"fp32, {how(4, True)}, CPU",
            )
        )
    elif path.wrapper == "BF16_Optimizer":
        # the model's bf16 gradients, and a whole (unpartitioned) fp32 buffer they are added
        # to after every backward (bf16_optimizer.py: fp32_groups_gradients_flat)
        lines.append(
            Line("gradients", share(2 + 4, False), 0, "bf16 2 + fp32 accumulation 4 B/param")
        )
    else:
        # in the accumulation dtype: ZeRO-0's .grad; ZeRO-1's .grad or, accumulating in
        # another dtype, .grad_accum, whole; ZeRO-2's (compact) partition buffer and ZeRO-3's
        # grad_partitions_flat_buffer, this rank's partition
        grads = share(a_bytes, stage >= 2)
        lines.append(Line("gradients", grads, 0, f"{path.accum}, {how(a_bytes, stage >= 2)}"))
    if w.offload_optimizer:
        # CPU Adam updates its own fp32 copy of the partition, in fp32 training too
        cpu = share(12, True)
        lines.append(Line("optimizer states", 0, cpu, f"fp32 copy, m, v: {how(12, True)}"))
    else:
        states = "fp32 master, m, v" if mixed else "Adam m, v"
        opt = share(o_bytes, stage >= 1)
        lines.append(Line("optimizer states", opt, 0, f"{states}: {how(o_bytes, stage >= 1)}"))
    if stage == 3:
        working = (p_bytes + g_bytes) * w.largest_module
        lines.append(
            Line(
                "gathered (ZeRO-3)",
                working,
                0,
                f"largest module, {w.largest_module / 1e6:,.0f}M params + grads",
                TRAIN,
            )
        )
    return lines + step_lines(w, path)


def step_lines(w: Workload, path: OptimizerPath) -> list[Line]:
    """What the optimizer step adds on the GPU while it runs (DeepSpeed 0.19.8 around
    torch.optim.AdamW, whose foreach step is PyTorch's default on CUDA): fp32 gradients made
    for the step, and AdamW's sqrt(v) temporary. Nothing on the GPU with an offloaded
    optimizer: CPU Adam steps the host's fp32 partition in place. On a CPU worker AdamW steps
    one tensor at a time (torch has no CPU foreach kernels): sqrt(v) and its quotient, 8
    bytes per element of the largest tensor a call updates."""
    if w.offload_optimizer:
        return []
    n, stage = w.world_size, path.stage
    grads = ""
    if stage == 0:
        # a param group at a time, and the weight-decay group holds nearly all parameters
        stepped, each = w.params, "B/param"
        if path.wrapper == "FP16_UnfusedOptimizer":
            # `fp32_param.grad = fp16_param.grad.to(fp32)` for every parameter, then the step
            grads = "16-bit grads copied to fp32"
    elif stage == 3:
        # one sub-group at a time: flatten(its gradient partitions).to(fp32), a new tensor
        # even in fp32 (stage3.py _prepare_fp32_grad_for_sub_group)
        stepped = min(math.ceil(w.params / n), ZERO3_SUB_GROUP)
        capped = stepped == ZERO3_SUB_GROUP
        each = "B x 1e9 params (a sub-group)" if capped else f"B/param / {n}"
        grads = "flat fp32 copy of a sub-group's gradient partition"
    else:
        stepped, each = math.ceil(w.params / n), f"B/param / {n}"
        compact = path.accum == "fp32" and w.precision != "fp32"
        if path.wrapper == "DeepSpeedZeroOptimizer" and not compact:
            # stage_1_and_2.py step(): flatten(averaged_gradients).to(fp32), a new tensor in
            # fp32 too (its source is freed before Adam only where nothing else holds it).
            # Accumulating 16-bit gradients in fp32, the partition is that flat fp32 buffer
            # already, as in BF16_Optimizer, whose partition is a view of its fp32 buffer.
            grads = "flat fp32 copy of this rank's gradient partition"
    lines = []
    if grads:
        lines.append(Line("fp32 gradients", 4 * stepped, 0, f"{grads}: 4 {each}", STEP))
    if w.device == "cpu":
        # _single_tensor_adam: (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps), per tensor:
        # at stage 0 each parameter is its own tensor; under ZeRO the partition is one flat one
        largest = min(w.largest_module, w.params) if stage == 0 else stepped
        what = "B x the largest parameter" if stage == 0 else each
        how = f"AdamW on CPU, tensor by tensor: sqrt(v) and its quotient, 8 {what}"
        lines.append(Line("Adam sqrt(v)", 8 * largest, 0, how, STEP))
        return lines
    lines.append(
        Line(
            "Adam sqrt(v)",
            4 * stepped,
            0,
            f"AdamW temporary, one per parameter a call updates: 4 {each}",
            STEP,
        )
    )
    return lines


# Korthikanti et al. 2022, section 4.1: what one layer keeps, in bytes per s*b*h in 16-bit
ATTENTION_BODY = 11  # the block's input 2, Q and K 4, V 2, the projection's input 2, mask 1
MLP_BODY = 19  # its input 2, the GeLU's input 8 and output 8, a dropout mask 1
NORMS_BODY = 4  # the two layernorms' inputs, 2 each
CROSS_BODY = ATTENTION_BODY + 2  # a decoder's cross-attention block and its norm
TILED_MLP = 2  # a tiled MLP and the norm recomputed with it keep only their input
# How a backend keeps attention scores for its backward pass (`score_kind`)
STORED, SPAN, LSE, RECOMPUTED = "stored", "adaptive span", "log-sum-exp", "recomputed"


def score_kind(backend: str, adaptive_span: bool = False) -> str:
    """What a self-attention backend keeps of its scores: STORED (`reference`: the dense
    softmax), SPAN (learned spans: their windowed weights), LSE (`sdpa`, `flex`: one fp32
    log-sum-exp per query and head) or RECOMPUTED (`blocksparse`: nothing)."""
    if adaptive_span:
        return SPAN
    return {"reference": STORED, "blocksparse": RECOMPUTED}.get(backend, LSE)


def score_bytes(w: Workload, kind: str, queries: int, keys: float) -> float:
    """Bytes one attention layer keeps of its scores: `queries` per sample (and head, over all
    heads), each scored against `keys` keys."""
    a, b, bits16 = w.n_heads, w.micro_batch, w.precision != "fp32"
    if kind == STORED:
        # fp32 softmax (4), and what multiplies V: the dropout's output (with its 1 B mask) or,
        # in 16-bit, the softmax cast back (2); in fp32 without dropout the softmax itself
        per = 4 + ((1 + _BYTES[w.precision]) if w.dropout else (2 if bits16 else 0))
        return a * queries * keys * b * per
    if kind == SPAN:
        # masked scores, their exp, the weighted exp, the weights (fp32; 16-bit keeps a cast
        # copy of the last instead), and the (a, s, k) soft mask and its fill mask per layer
        return a * queries * keys * (b * (14 if bits16 else 16) + 5)
    if kind == LSE:
        return 4 * a * queries * b
    return 0.0


def _per_rank(w: Workload) -> str:
    p = w.seq_parallel
    return f", s/P: each of P={p} ranks holds s/{p} tokens (Ulysses)" if p > 1 else ""


def activation_lines(w: Workload) -> list[Line]:
    """Activations (Korthikanti et al. 2022), attention scores as each backend keeps them,
    dense masks and logits, per GPU (per CPU process)."""
    scale = 1 if w.precision != "fp32" else 2  # the paper counts 16-bit tensors
    b, h, p = w.micro_batch, w.d_model, w.seq_parallel
    kv = w.kv_dim or h
    head_dim = h // w.n_heads
    x2 = " (x2 fp32)" if scale == 2 else ""
    upcast = w.fp32_qkv and w.precision != "fp32"  # an fp32 run saves q, k, v as they are
    kind = score_kind(w.backend, w.adaptive_span)
    cross_kind = STORED if w.backend == "reference" else LSE  # cross-attention: sdpa otherwise

    def local(st: Stack) -> int:  # tokens of each sample on this rank
        return st.seq_len // p

    def tiled(st: Stack) -> bool:  # models/layers.py runs whole sequences in one piece
        return w.mlp_chunk is not None and w.mlp_chunk < local(st)

    def units(st: Stack) -> int:  # bytes per s*b*h in 16-bit, one layer
        norm = NORMS_BODY // 2  # the attention block's
        mlp = TILED_MLP if tiled(st) else NORMS_BODY // 2 + MLP_BODY
        return ATTENTION_BODY + norm + mlp + (CROSS_BODY if st.cross_keys else 0)

    def body(st: Stack) -> int:  # one layer
        return local(st) * b * h * units(st) * scale

    def tile(st: Stack) -> int:  # one chunk's MLP intermediates, while it is (re)computed
        return MLP_BODY * (w.mlp_chunk or 0) * b * h * scale if tiled(st) else 0

    def scores(st: Stack) -> int:  # a/P heads over s queries: the count of a heads over s/P
        own = score_bytes(w, kind, local(st), st.keys_per_query)
        cross = score_bytes(w, cross_kind, local(st), st.cross_keys) if st.cross_keys else 0
        return round(own + cross)

    def qkv32(st: Stack) -> int:  # one layer's self-attention: 4 B instead of the paper's 2
        # each rank: q of s/P tokens, k and v of the whole sequence for its kv heads (a copy
        # of one where P exceeds them)
        kv_rank = kv if p == 1 else max(kv // p, head_dim)
        return 2 * b * (local(st) * h + 2 * st.seq_len * kv_rank) if upcast else 0

    tiles = max(tile(st) for st in w.stacks)
    if not w.checkpointing:
        act = sum(st.layers * body(st) for st in w.stacks) + tiles
        att = sum(st.layers * scores(st) for st in w.stacks)
        extra = sum(st.layers * qkv32(st) for st in w.stacks)
        act_how = f"{_body_how(w, units)} x layers{x2}"
        layers = "x layers"
    else:
        inputs = sum(st.layers * 2 * local(st) * b * h * scale for st in w.stacks)
        # recomputed in backward, one layer at a time: the largest
        full = max(w.stacks, key=lambda st: body(st) + tile(st) + scores(st) + qkv32(st))
        act, att, extra = inputs + body(full) + tile(full), scores(full), qkv32(full)
        act_how = f"2*s*b*h x layers + one layer{x2}"
        if tiles:
            act_how = f"2*s*b*h x layers + one layer of {_body_how(w, units)}{x2}"
        layers = "one layer"
    if tiles:
        act_how += f"; + one MLP tile, 19*T*b*h (T={w.mlp_chunk:,})"
    act_how += _per_rank(w)
    lines = [
        # its tensors are a rank's (s/P, b, h) or a few times that (the CPU heap model's size)
        Line("activations", act, 0, act_how, TRAIN, tensor=activation_tensor(w)),
        Line("attention scores", att, 0, _scores_how(w, kind, layers), TRAIN),
    ]
    if extra:
        lines.append(
            Line(
                "fp32 q, k, v",
                extra,
                0,
                f"blocksparse saves fp32 copies: +2 B over 16-bit, 2*s*b*(h+2*kv) {layers}",
                TRAIN,
            )
        )
    lines += mask_lines(w)
    tokens = w.logits_len // p * b  # the LM head's and the loss's, on this rank
    chunked = w.loss_chunk is not None and w.loss_chunk < tokens
    rows = w.loss_chunk if chunked and w.loss_chunk else tokens
    each = _BYTES[w.precision]
    what = f"logits {each} B + fp32 log-softmax 4 B (fused loss); grads s*b*h x {each} B, V*h x 4 B"
    how = (
        f"one chunk of C={rows:,} tokens x V x {each + 4} B (loss_chunk_tokens): {what}"
        if chunked
        else f"s*b*V x {each + 4} B: {what}" + _per_rank(w)
    )
    held = loss_bytes(tokens, rows, w.vocab_size, h, each)
    lines.append(Line("logits", held, 0, how, TRAIN, tensor=rows * w.vocab_size * 4))
    if w.device == "cpu":
        lines.append(
            Line(
                "framework",
                CPU_FRAMEWORK_OVERHEAD,
                0,
                f"{human(CPU_FRAMEWORK_OVERHEAD)}/process: torch, DeepSpeed, gloo (measured RSS)",
            )
        )
    else:
        lines.append(Line("framework", FRAMEWORK_OVERHEAD, 0, "1 GiB/process: CUDA context etc."))
    return lines


def loss_bytes(tokens: int, rows: int, vocab: int, width: int, each: int) -> int:
    """What the fused LM head and loss (models/loss.py) hold at the end of forward, on `tokens`
    tokens in chunks of `rows`: the logits buffer in the model's dtype (`each` bytes) and the
    fp32 log-softmax's, the hidden states' gradient, the head weight's fp32 gradient."""
    return rows * vocab * (each + 4) + tokens * width * each + vocab * width * 4


def activation_tensor(w: Workload) -> int:
    """Bytes of one activation tensor of the longest stack, a rank's (s/P, b, h) slice in the
    model's dtype: the size the CPU heap model tests against glibc's mmap threshold."""
    tokens = max(st.seq_len for st in w.stacks) // w.seq_parallel * w.micro_batch
    return tokens * w.d_model * _BYTES[w.precision]


def _body_how(w: Workload, units: Any) -> str:
    """'34*s*b*h' (the paper's layer), or a layer with a tiled MLP: '15*s*b*h (...)'."""
    parts = sorted({units(st) for st in w.stacks})
    if parts in ([34], [34, 47]):
        return "34*s*b*h"
    tiled = "/".join(str(u) for u in parts)
    return f"{tiled}*s*b*h (a tiled MLP and its norm keep their input: 2 of 19 + 2)"


def _scores_how(w: Workload, kind: str, layers: str) -> str:
    if kind == STORED:
        per = (
            f"(4 + 1 + {_BYTES[w.precision]})"
            if w.dropout
            else ("(4 + 2)" if w.precision != "fp32" else "4")
        )
        return f"reference keeps its softmax: a*s*k*b x {per} B {layers}, {_keys(w.stacks)}"
    if kind == SPAN:
        per = 14 if w.precision != "fp32" else 16
        return f"adaptive span's weights: a*s*k*b x {per} B {layers}, {_keys(w.stacks)}"
    has_cross = any(st.cross_keys for st in w.stacks)
    cross = " (cross-attention through sdpa: its log-sum-exp)" if has_cross else ""
    if kind == LSE:
        return (
            f"not stored: {w.backend} recomputes them in backward; its fp32 log-sum-exp, "
            f"4*a*s*b {layers}{_per_rank(w)}"
        )
    return (
        f"not stored: {w.backend} recomputes them from q, k, v in backward and keeps no "
        f"per-row statistics{cross}"
    )


def mask_lines(w: Workload) -> list[Line]:
    """A per-batch dense mask SDPA (or `reference`) attends with, shared by every layer: the
    documents of packed samples (b, 1, s, s), or ALiBi's (1, a, s, s) bias, in the model's
    dtype; `reference` always builds one. A sequence-parallel rank masks the whole sequence
    for its a/P heads."""
    reference = w.backend == "reference"
    if w.adaptive_span or not (reference or (w.backend == "sdpa" and (w.doc_mask or w.alibi))):
        return []
    rows = w.micro_batch if w.doc_mask else 1
    heads = w.n_heads // w.seq_parallel if w.alibi else 1
    each = _BYTES[w.precision]
    # cross-attention's mask: `reference` always, sdpa only for padded sources (not counted)
    squares = sum(
        st.seq_len * (st.seq_len + (st.cross_keys if reference else 0)) for st in w.stacks
    )
    what = " and ".join(name for name, on in (("documents", w.doc_mask), ("ALiBi", w.alibi)) if on)
    per = "b" if w.doc_mask else "1"
    if w.alibi:
        per += "*a/P" if w.seq_parallel > 1 else "*a"
    how = (
        f"{w.backend}'s per-batch mask ({what or 'the pattern'}): {per}*s^2 x {each} B, all layers"
    )
    largest = rows * heads * max(st.seq_len for st in w.stacks) ** 2 * each
    return [Line("attention mask", rows * heads * squares * each, 0, how, TRAIN, tensor=largest)]


def _keys(stacks: tuple[Stack, ...]) -> str:
    """'k=1,024 keys/query', naming each stack when there are several."""
    ks = [
        f"{st.keys_per_query:,.0f}"
        + (f"+{st.cross_keys:,}" if st.cross_keys else "")
        + (f" ({st.name})" if len(stacks) > 1 else "")
        for st in stacks
    ]
    return f"k={', '.join(ks)} keys/query"


def heap_line(w: Workload, lines: list[Line]) -> Line:
    """A CPU worker's glibc heap beyond its live forward/backward tensors: CPU_HEAP_FACTOR
    times their bytes, and with sequence parallelism one forward pass's all-to-all buffers;
    tensors at or above the mmap threshold (CPU_WORKER_ENV's, or glibc's own with its
    defaults) are mapped and returned whole."""
    from pipeline.train.ops import CPU_WORKER_ENV

    threshold = (
        int(CPU_WORKER_ENV["MALLOC_MMAP_THRESHOLD_"])
        if w.worker_malloc
        else GLIBC_MMAP_THRESHOLD_MAX
    )
    live = heap = 0.0
    for line in lines:
        if line.phase != TRAIN or line.tensor >= threshold:
            continue
        live += line.gpu
        heap += CPU_HEAP_FACTOR * line.gpu
    # with sequence parallelism, one all-to-all buffer is a rank's slice of the residual
    sp_buffers = w.seq_parallel > 1 and activation_tensor(w) < threshold
    if sp_buffers:
        # models/parallel.py: each all-to-all stacks its input into a send buffer and
        # receives into another, for q, k, v and the output of every layer; freed blocks of
        # the same size are not reused (see CPU_HEAP_FACTOR), so about one forward pass's
        # worth stays: measured 3.21 GB against 3.23 planned (BigBird, P=2, 16K) and 7.40
        # against 6.95 (64K, checkpointing, chunked loss and MLP), 5.88 without this term
        each = 2 * (2 * w.d_model + 2 * (w.kv_dim or w.d_model)) * w.micro_batch
        heap += (
            sum(st.layers * st.seq_len // w.seq_parallel for st in w.stacks)
            * each
            * (_BYTES[w.precision])
        )
    extras = [text for text, on in (("one forward's all-to-all buffers", sp_buffers),) if on]
    how = (
        f"glibc heap ({'CPU_WORKER_ENV' if w.worker_malloc else 'malloc defaults'}): "
        f"x{CPU_HEAP_FACTOR:g} the fwd/bwd tensors under "
        f"{human(threshold)}{''.join(', ' + e for e in extras)} (measured)"
    )
    return Line("allocator", max(0, round(heap - live)), 0, how, TRAIN)


def estimate(w: Workload) -> list[Line]:
    """Every line of the per-GPU estimate (per process, for a CPU worker); workers sharing one
    GPU add up."""
    lines = model_state_lines(w) + activation_lines(w)
    if w.device == "cpu":
        return [*lines, heap_line(w, lines)]
    k = w.workers_per_gpu
    if k == 1:
        return lines
    return [replace(line, gpu=line.gpu * k, cpu=line.cpu * k) for line in lines]


def gpu_total(w: Workload) -> int:
    """The peak GPU bytes of a workload (see `peak`)."""
    return peak(estimate(w))


def host_total(w: Workload) -> int:
    """One CPU worker process's peak memory: its peak, with what it offloads to itself."""
    lines = estimate(replace(w, device="cpu", workers_per_gpu=1))
    return peak(lines) + sum(line.cpu for line in lines)


# --------------------------------------------------------------------------- from a spec


def keys_per_query(attention: AttentionConfig, causal: bool, n_heads: int, seq_len: int) -> float:
    """Keys each query scores, on average over queries and heads: s for a dense pattern, the
    block layout's tiles per row times the block size for a sparse one (what a block-sparse
    kernel computes). The layout is analytic, O(blocks), never S x S points."""
    from models.transformer import stack_pattern

    pattern = stack_pattern(attention, causal, n_heads)
    if pattern.is_dense:
        return float(seq_len)
    layout = pattern.block_layout(seq_len, attention.block_size)  # (H|1, N, N)
    per_row = layout.float().mean().item() * layout.shape[-1]
    return min(float(seq_len), per_row * attention.block_size)


def _model_sizes(spec: JobSpec) -> tuple[int, int]:
    """(parameters, parameters of the largest single module), counted on the built model."""
    from accelerate import init_empty_weights

    from models.transformer import build_model

    # include_buffers: everything on the meta device, no memory and no initialisation, so a
    # 7B model is built in well under a second and exotic configs are counted as built.
    with init_empty_weights(include_buffers=True):
        model = build_model(spec.model.architecture(), spec.attention)
    params = sum(p.numel() for p in model.parameters())  # tied weights count once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return params, largest


_DTYPES = {
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
    "torch.float32": "fp32",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "torch.bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "torch.float16": "fp16",
}


def _deepspeed_runs(spec: JobSpec) -> tuple[tuple[tuple[int, bool, bool], tuple[int, str]], ...]:
    """For every ZeRO setting the planner may try on this spec, what DeepSpeed runs: the stage
    and the gradient accumulation dtype of the config the workers get (deepspeed_config)."""
    from pipeline.train.deepspeed_config import deepspeed_config

    runs = []
    for stage, offload_optimizer, offload_params in (
        (0, False, False),
        *((s, o, False) for s in (1, 2, 3) for o in (False, True)),
        (3, False, True),
        (3, True, True),
    ):
        ds = spec.deepspeed.model_copy(
            update=dict(
                zero_stage=stage,
                offload_optimizer=offload_optimizer,
                offload_params=offload_params,
            )
        )
        config = deepspeed_config(spec.model_copy(update={"deepspeed": ds}))
        accum = (config.get("data_types") or {}).get("grad_accum_dtype")
        runs.append(
            (
                (stage, offload_optimizer, offload_params),
                (
                    int(config["zero_optimization"]["stage"]),
                    _DTYPES[str(accum).lower()] if accum else spec.training.precision,
                ),
            )
        )
    return tuple(runs)


def workload(spec: JobSpec) -> Workload:
    """The numbers of the estimate, from a validated spec (builds the model on meta)."""
    m, data, t, ds, r = spec.model, spec.data, spec.training, spec.deepspeed, spec.resources
    params, largest = _model_sizes(spec)
    arch = m.architecture()
    src = data.max_source_len or data.seq_len
    tgt = data.max_target_len or data.seq_len
    if m.family == "decoder":
        stacks = [("decoder", m.n_layers, data.seq_len, True, 0)]
    elif m.family == "encoder":
        stacks = [("encoder", m.n_layers, data.seq_len, False, 0)]
    else:
        stacks = [
            ("encoder", m.encoder_layers, src, False, 0),
            ("decoder", m.decoder_layers, tgt, True, src),
        ]
    attention, span = spec.attention, spec.attention.adaptive_span

    def keys(causal: bool, s: int) -> float:
        if attention.backend == "reference":
            return float(s)  # it scores the dense (s, s), masked
        if span is not None and causal:  # the largest span and ramp, a block of queries at once
            return float(min(s, span.max_span + span.ramp + attention.block_size))
        return keys_per_query(attention, causal, m.n_heads, s)

    return Workload(
        params=params,
        largest_module=largest,
        d_model=m.d_model,
        n_heads=m.n_heads,
        vocab_size=m.vocab_size,
        stacks=tuple(
            Stack(name, layers, s, keys(causal, s), cross)
            for name, layers, s, causal, cross in stacks
        ),
        logits_len=tgt if m.family == "encoder_decoder" else data.seq_len,
        precision=t.precision,
        zero_stage=ds.zero_stage,
        offload_optimizer=ds.offload_optimizer,
        offload_params=ds.offload_params,
        world_size=r.num_workers,
        micro_batch=t.micro_batch_size,
        global_batch=t.global_batch_size,
        checkpointing=t.activation_checkpointing,
        workers_per_gpu=_workers_per_gpu(r.gpus_per_worker, r.num_workers),
        kv_dim=arch.kv_heads * arch.head_dim,
        # blocksparse upcasts 16-bit q, k, v and saves the fp32 copies for its backward; a
        # learned span attends through its own path, and cross-attention through sdpa
        fp32_qkv=spec.attention.backend == "blocksparse" and spec.attention.adaptive_span is None,
        deepspeed_runs=_deepspeed_runs(spec),
        backend=attention.backend,
        adaptive_span=span is not None,
        dropout=m.dropout > 0,
        doc_mask=t.document_masking and m.family in ("decoder", "encoder"),
        alibi=m.positional == "alibi",
        seq_parallel=r.sequence_parallel,
        sp_options=_sp_options(spec),
        loss_chunk=t.loss_chunk_tokens,
        mlp_chunk=t.mlp_chunk_tokens,
        device="cuda",  # a CPU spec too: `attnpipe plan` plans one GPU per worker
    )


def _sp_options(spec: JobSpec) -> tuple[int, ...]:
    """Every resources.sequence_parallel the spec's workers, sequence and heads allow (the
    checks of pipeline.config's JobSpec: P divides the workers, data.seq_len and the heads;
    key/value heads divide by P or P by them; no encoder-decoder)."""
    arch, r = spec.model.architecture(), spec.resources
    if arch.family == "encoder_decoder":
        return ()
    return tuple(
        p
        for p in range(1, r.num_workers + 1)
        if not (r.num_workers % p or spec.data.seq_len % p or arch.n_heads % p)
        and not (arch.kv_heads % p and p % arch.kv_heads)
    )


def _workers_per_gpu(gpus_per_worker: float, num_workers: int) -> int:
    """Ray packs 1/g workers on a GPU when each asks for a fraction g of one."""
    if 0 < gpus_per_worker < 1:
        return max(1, min(num_workers, math.floor(1 / gpus_per_worker + 1e-9)))
    return 1


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Suggestion:
    overrides: tuple[str, ...]
    gpu_total: int


# Tokens per chunk the planner tries for training.loss_chunk_tokens and mlp_chunk_tokens,
# mildest first (a chunk's GEMMs stay large enough to run near full speed)
CHUNK_TOKENS = (8192, 4096, 2048, 1024)


def _levers(w: Workload) -> list[list[Workload]]:
    """Each way to save GPU memory, as its settings from mildest to strongest."""
    data_parallel = w.world_size // w.seq_parallel
    valid_micro = [
        m
        for m in range(w.micro_batch - 1, 0, -1)
        # keep global_batch_size a multiple of micro_batch_size x data-parallel workers
        if w.global_batch % (m * data_parallel) == 0
    ]
    # chunks smaller than what runs in one piece now: the LM head's tokens on this rank, and
    # each sample's longest stack on it
    loss_tokens = w.loss_chunk or w.logits_len // w.seq_parallel * w.micro_batch
    mlp_tokens = w.mlp_chunk or max(st.seq_len for st in w.stacks) // w.seq_parallel
    return [
        [] if w.checkpointing else [replace(w, checkpointing=True)],
        [replace(w, zero_stage=s) for s in range(w.zero_stage + 1, 4)],
        []
        if w.offload_optimizer
        else [replace(w, zero_stage=max(w.zero_stage, 1), offload_optimizer=True)],
        [] if w.offload_params else [replace(w, zero_stage=3, offload_params=True)],
        [replace(w, micro_batch=m) for m in valid_micro],
        [replace(w, loss_chunk=c) for c in CHUNK_TOKENS if c < loss_tokens],
        [replace(w, mlp_chunk=c) for c in CHUNK_TOKENS if c < mlp_tokens],
        # more workers per sample: the workers must allow it (w.sp_options)
        [replace(w, seq_parallel=p) for p in w.sp_options if p > w.seq_parallel],
    ]


def _overrides(before: Workload, after: Workload) -> tuple[str, ...]:
    """The spec overrides that turn one workload into the other."""
    fields = (
        ("training.activation_checkpointing", "checkpointing"),
        ("deepspeed.zero_stage", "zero_stage"),
        ("deepspeed.offload_optimizer", "offload_optimizer"),
        ("deepspeed.offload_params", "offload_params"),
        ("training.micro_batch_size", "micro_batch"),
        ("training.loss_chunk_tokens", "loss_chunk"),
        ("training.mlp_chunk_tokens", "mlp_chunk"),
        ("resources.sequence_parallel", "seq_parallel"),
    )
    out = []
    for key, attr in fields:
        value = getattr(after, attr)
        if value != getattr(before, attr):
            out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return tuple(out)


def suggestions(w: Workload, capacity: int) -> list[Suggestion]:
    """Changes that make the job fit, each checked by re-running the estimate: every single
    change that does (at its mildest setting); when none does, the fewest changes that
    do together, taken in the order checkpointing, ZeRO stage, offloads, micro batch, loss
    chunks, MLP tiles, sequence parallelism."""
    out = []
    for options in _levers(w):
        fit = next((o for o in options if gpu_total(o) <= capacity), None)
        if fit is not None:
            out.append(Suggestion(_overrides(w, fit), gpu_total(fit)))
    if out:
        return out
    current = w
    for i in range(len(_levers(w))):
        options = _levers(current)[i]
        fit = next((o for o in options if gpu_total(o) <= capacity), None)
        if fit is not None:
            return [Suggestion(_overrides(w, fit), gpu_total(fit))]
        if options and gpu_total(options[-1]) < gpu_total(current):
            current = options[-1]
    return []


@dataclass(frozen=True)
class Plan:
    job: str
    workload: Workload
    lines: tuple[Line, ...]
    gpu: GPU | None
    suggestions: tuple[Suggestion, ...]
    notes: tuple[str, ...]
    cpu_worker: int | None = None  # a CPU job: one worker process's peak RSS (host_total)

    @property
    def gpu_total(self) -> int:
        """The peak: always-held lines plus the larger of forward/backward and the step."""
        return peak(self.lines)

    def phase_total(self, phase: str) -> int:
        return sum(line.gpu for line in self.lines if line.phase == phase)

    @property
    def cpu_total(self) -> int:
        return sum(line.cpu for line in self.lines)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu is None else self.gpu_total <= self.gpu.memory

    def verdict(self) -> str:
        """One plain sentence: fits or not, by how much, and what would help."""
        total = human(self.gpu_total)
        if self.gpu is None:
            return (
                f"estimate: {total} per GPU; no GPU type given (resources.gpu_type), "
                "so fit is not judged"
            )
        has = human(self.gpu.memory)
        if self.fits:
            share = self.gpu_total / self.gpu.memory
            return f"fits on {self.gpu.name}: {total} of {has} ({share:.0%})"
        head = f"does NOT fit on {self.gpu.name}: needs {total}, has {has}"
        if not self.suggestions:
            return (
                f"{head}; it does not fit even with activation checkpointing, ZeRO-3, both "
                "offloads, micro batch 1, loss chunks and MLP tiles"
                + (" and sequence parallelism" if len(self.workload.sp_options) > 1 else "")
                + ": use a larger GPU or a shorter data.seq_len"
            )
        tries = " / ".join(
            f"{' '.join(s.overrides)} ({human(s.gpu_total)})" for s in self.suggestions
        )
        return f"{head}; try: {tries}"

    def to_json(self) -> dict[str, Any]:
        w = self.workload
        path = optimizer_path(w)
        return {
            "job": self.job,
            "params": w.params,
            "largest_module_params": w.largest_module,
            "precision": w.precision,
            "zero_stage": w.zero_stage,
            "offload_optimizer": w.offload_optimizer,
            "offload_params": w.offload_params,
            "world_size": w.world_size,
            "workers_per_gpu": w.workers_per_gpu,
            "micro_batch_size": w.micro_batch,
            "activation_checkpointing": w.checkpointing,
            "kv_dim": w.kv_dim or w.d_model,
            "fp32_qkv": w.fp32_qkv,
            "attention_backend": w.backend,
            "attention_scores": score_kind(w.backend, w.adaptive_span),
            "sequence_parallel": w.seq_parallel,
            "loss_chunk_tokens": w.loss_chunk,
            "mlp_chunk_tokens": w.mlp_chunk,
            "deepspeed": {
                "stage": path.stage,
                "grad_accum_dtype": path.accum,
                "optimizer": path.wrapper,
            },
            "stacks": [
                {
                    "name": st.name,
                    "layers": st.layers,
                    "seq_len": st.seq_len,
                    "keys_per_query": st.keys_per_query,
                    "cross_keys": st.cross_keys,
                }
                for st in w.stacks
            ],
            "framework_overhead_bytes": FRAMEWORK_OVERHEAD,
            "components": [
                {
                    "component": line.component,
                    "phase": line.phase,
                    "gpu_bytes": line.gpu,
                    "cpu_bytes": line.cpu,
                    "detail": line.detail,
                }
                for line in self.lines
            ],
            # the peak: always + max(forward/backward, optimizer step)
            "gpu_total_bytes": self.gpu_total,
            "gpu_phase_bytes": {phase: self.phase_total(phase) for phase in (HELD, TRAIN, STEP)},
            "cpu_total_bytes": self.cpu_total,
            "gpu": None
            if self.gpu is None
            else {"name": self.gpu.name, "memory_bytes": self.gpu.memory},
            "fits": self.fits,
            "utilization": None if self.gpu is None else self.gpu_total / self.gpu.memory,
            "suggestions": [
                {"overrides": list(s.overrides), "gpu_total_bytes": s.gpu_total}
                for s in self.suggestions
            ],
            "verdict": self.verdict(),
            "notes": list(self.notes),
            # a CPU job (gpus_per_worker 0): one worker process's predicted peak RSS
            "cpu_worker_peak_bytes": self.cpu_worker,
        }


def plan_job(spec: JobSpec, source: str = "<spec>") -> Plan:
    """The memory plan of a validated spec. `source` names the spec in error messages."""
    r = spec.resources
    gpu = find_gpu(r.gpu_type, source) if r.gpu_type is not None else None
    w = workload(spec)
    lines = tuple(estimate(w))
    total = peak(lines)
    fits = gpu is None or total <= gpu.memory
    found = tuple(suggestions(w, gpu.memory)) if gpu is not None and not fits else ()
    cpu_worker = host_total(w) if r.gpus_per_worker == 0 else None
    notes = _notes(spec, w, lines, gpu, cpu_worker)
    return Plan(spec.job.name, w, lines, gpu, found, notes, cpu_worker)


def predicted_peak_bytes(spec: JobSpec, worker_malloc: bool = True) -> int:
    """The peak memory of one training worker: for a CPU spec (gpus_per_worker 0) its
    process's peak host memory, the RSS `ru_maxrss` reports (framework, model states and
    what it offloads to itself, activations, scores, masks, logits, the optimizer step's
    temporaries and glibc's heap: under CPU_WORKER_ENV, as attnpipe's workers run, or with
    glibc's defaults where `worker_malloc` is False); for a GPU spec the per-GPU peak of
    `attnpipe plan`."""
    w = replace(workload(spec), worker_malloc=worker_malloc)
    return host_total(w) if spec.resources.gpus_per_worker == 0 else gpu_total(w)


def _notes(
    spec: JobSpec,
    w: Workload,
    lines: tuple[Line, ...],
    gpu: GPU | None,
    cpu_worker: int | None = None,
) -> tuple[str, ...]:
    r, notes = spec.resources, []
    if r.gpus_per_worker == 0:
        notes.append("resources.gpus_per_worker is 0 (a CPU run): planned as one GPU per worker")
        if cpu_worker is not None:
            notes.append(
                f"as a CPU worker process its peak memory (RSS) is about {human(cpu_worker)}: "
                f"the lines above with a {human(CPU_FRAMEWORK_OVERHEAD)} host framework for the "
                f"CUDA context, AdamW's CPU temporaries and glibc's heap (x{CPU_HEAP_FACTOR:g} "
                "the fwd/bwd bytes)"
            )
    elif w.workers_per_gpu > 1:
        notes.append(
            f"resources.gpus_per_worker={r.gpus_per_worker:g}: {w.workers_per_gpu} workers "
            "share each GPU, and every line counts all of them"
        )
    elif r.gpus_per_worker > 1:
        notes.append(
            f"resources.gpus_per_worker={r.gpus_per_worker:g}: each worker's DeepSpeed engine "
            "uses one GPU (data parallel only), so the others hold nothing"
        )
    if w.world_size == 1 and w.zero_stage > 0:
        notes.append("ZeRO partitions over the workers: with one worker it saves nothing")
    if w.doc_mask and any(line.component == "attention mask" for line in lines):
        notes.append(
            "the attention mask line counts packed samples of several documents "
            "(training.document_masking); a batch whose rows are one document each gets none"
        )
    if spec.attention.backend == "blocksparse" and (r.gpu_type is not None or r.gpus_per_worker):
        qkv = any(line.component == "fp32 q, k, v" for line in lines)
        notes.append(
            "backend 'blocksparse' is the CPU path: on CUDA its Python loop launches several "
            "small kernels per (batch row, head, chunk of query blocks) in every layer, so it "
            "is slow on GPUs; 'flex' (FlexAttention, compiled) is the training backend on GPUs: "
            "attention.backend=flex"
            + (", which also keeps no fp32 copies of q, k, v" if qkv else "")
        )
    return tuple(notes)


# --------------------------------------------------------------------------- output


def human(n: int) -> str:
    """Bytes in binary units: '23.4 GiB', '512.0 MiB', '-' for nothing."""
    if n == 0:
        return "-"
    for unit, size in (("TiB", 1024**4), ("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size * 1000 / 1024:  # 1000 MiB reads better as 1.0 GiB
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def headline(plan: Plan) -> str:
    """The job in one line: size, precision, ZeRO, cluster, batch and sequence."""
    w = plan.workload
    lengths = " / ".join(f"{st.name} {st.seq_len:,}" for st in w.stacks)
    offload = " and ".join(
        name
        for name, on in (("optimizer", w.offload_optimizer), ("params", w.offload_params))
        if on
    )
    sharing = f" ({w.workers_per_gpu} per GPU)" if w.workers_per_gpu > 1 else ""
    path = optimizer_path(w)
    runs = f" (DeepSpeed runs stage {path.stage})" if path.stage != w.zero_stage else ""
    long = ""
    if w.seq_parallel > 1:
        long += f", sequence parallel {w.seq_parallel}"
    if w.loss_chunk:
        long += f", loss in chunks of {w.loss_chunk:,} tokens"
    if w.mlp_chunk:
        long += f", MLP in tiles of {w.mlp_chunk:,} tokens"
    return (
        f"{plan.job}: {w.params:,} params, {w.precision}, ZeRO-{w.zero_stage}{runs} "
        f"with {path.wrapper}"
        f"{' + offload ' + offload if offload else ''}, {w.world_size} "
        f"worker{'s' if w.world_size != 1 else ''}{sharing}, micro batch {w.micro_batch} x "
        f"{lengths} tokens{', activation checkpointing' if w.checkpointing else ''}{long}"
    )


_WHEN = {HELD: "always", TRAIN: "fwd/bwd", STEP: "step"}


def render(plan: Plan) -> None:
    """Print the plan: the job, a table of components with the total, the verdict, notes."""
    from rich.console import Console
    from rich.table import Table

    table = Table()
    table.add_column("component")
    table.add_column("when")
    table.add_column("per GPU", justify="right")
    table.add_column("CPU", justify="right")
    table.add_column("how")
    for line in plan.lines:
        when = _WHEN[line.phase] if line.gpu else ""
        table.add_row(line.component, when, human(line.gpu), human(line.cpu), line.detail)
    table.add_section()
    held, train, step = (human(plan.phase_total(p)) for p in (HELD, TRAIN, STEP))
    how = f"peak: always {held} + the larger of fwd/bwd {train} and step {step}"
    table.add_row("total", "", human(plan.gpu_total), human(plan.cpu_total), how)
    console = Console(highlight=False)
    # plain lines are never wrapped by rich, so they stay greppable
    console.print(headline(plan), soft_wrap=True, markup=False)
    console.print(table)
    console.print(plan.verdict(), soft_wrap=True, markup=False)
    for note in plan.notes:
        console.print(f"note: {note}", soft_wrap=True, markup=False)
