"""The memory planner behind `attnpipe plan`: what each GPU holds while a job trains, and
whether that fits the GPU the spec names (`resources.gpu_type`).

Model states follow the ZeRO paper's accounting (Rajbhandari et al. 2020, section 3.1).
With P parameters and mixed precision (bf16/fp16) training holds 2P bytes of 16-bit
parameters, 2P of 16-bit gradients and 12P of optimizer state (fp32 master weights, Adam's
m and v); fp32 training holds 4P + 4P + 8P. Over N data-parallel ranks ZeRO-1 partitions
the optimizer state, ZeRO-2 the gradients too, ZeRO-3 the parameters too (each / N).
Offloading the optimizer (ZeRO-Offload) keeps the fp32 partition, m and v in host memory,
and from ZeRO-2 on the fp32 gradient partition as well; offloading parameters (ZeRO-3)
keeps their partition there too.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", section 4.1): one transformer layer stores s*b*h*(34 + 5*a*s/h) bytes
in 16-bit, where 34*s*b*h is the layer body and 5*a*s^2*b the attention scores, their
softmax and its dropout mask. A sparse pattern scores only the keys a query meets: k keys
per query, read from its block layout, give 5*a*s*k*b. With activation checkpointing each
layer keeps only its input (2*s*b*h) and one layer at a time is recomputed in full.

Symbols: P parameters, N data-parallel ranks, s sequence length, b micro batch, h model
width, a attention heads, k keys per query, V vocabulary.
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
    keys_per_query: float  # keys whose scores a query stores: s when dense
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


@dataclass(frozen=True)
class Line:
    component: str
    gpu: int  # bytes on each GPU
    cpu: int  # bytes of host memory per GPU (offloaded states)
    detail: str


def model_state_lines(w: Workload) -> list[Line]:
    """Parameters, gradients and optimizer state per GPU, by ZeRO stage and offload."""
    mixed = w.precision != "fp32"
    p_bytes, g_bytes, o_bytes = (2, 2, 12) if mixed else (4, 4, 8)
    n, stage = w.world_size, w.zero_stage

    def share(bytes_per_param: int, partitioned: bool) -> int:
        return (
            math.ceil(w.params * bytes_per_param / n) if partitioned else w.params * bytes_per_param
        )

    def how(bytes_per_param: int, partitioned: bool) -> str:
        return f"{bytes_per_param} B/param" + (f" / {n}" if partitioned else "")

    params = share(p_bytes, stage >= 3)
    grads = share(g_bytes, stage >= 2)
    dtype = w.precision
    lines = [
        Line(
            "parameters",
            0 if w.offload_params else params,
            params if w.offload_params else 0,
            f"{dtype}, {how(p_bytes, stage >= 3)}" + (", CPU" if w.offload_params else ""),
        )
    ]
    if w.offload_optimizer and stage >= 2:
        # ZeRO-Offload reduces into an fp32 gradient partition in host memory for CPU Adam
        lines.append(Line("gradients", 0, share(4, True), f"fp32, {how(4, True)}, CPU"))
    else:
        lines.append(Line("gradients", grads, 0, f"{dtype}, {how(g_bytes, stage >= 2)}"))
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
            )
        )
    return lines


def activation_lines(w: Workload) -> list[Line]:
    """Activations (Korthikanti et al. 2022), attention scores and logits per GPU."""
    scale = 1 if w.precision != "fp32" else 2  # the paper counts 16-bit tensors
    b, h, a = w.micro_batch, w.d_model, w.n_heads
    x2 = " (x2 fp32)" if scale == 2 else ""

    def body(st: Stack) -> int:  # one layer; cross-attention adds 11sbh + a 2sbh norm
        return st.seq_len * b * h * (34 + (13 if st.cross_keys else 0)) * scale

    def scores(st: Stack) -> int:
        keys = st.keys_per_query + st.cross_keys
        return round(5 * a * st.seq_len * keys * b) * scale

    if not w.checkpointing:
        act = sum(st.layers * body(st) for st in w.stacks)
        att = sum(st.layers * scores(st) for st in w.stacks)
        act_how = f"34*s*b*h x layers{x2}"
        att_how = f"5*a*s*k*b x layers, {_keys(w.stacks)}{x2}"
    else:
        inputs = sum(st.layers * 2 * st.seq_len * b * h * scale for st in w.stacks)
        full = max(w.stacks, key=lambda st: body(st) + scores(st))  # recomputed, one at a time
        act, att = inputs + body(full), scores(full)
        act_how = f"2*s*b*h x layers + one layer{x2}"
        att_how = f"one layer, {_keys(w.stacks)}{x2}"
    logits = w.logits_len * b * w.vocab_size * 4
    lines = [
        Line("activations", act, 0, act_how),
        Line("attention scores", att, 0, att_how),
        Line("logits", logits, 0, "s*b*V, fp32 for the loss"),
        Line("framework", FRAMEWORK_OVERHEAD, 0, "1 GiB/process: CUDA context etc."),
    ]
    return lines


def _keys(stacks: tuple[Stack, ...]) -> str:
    """'k=1,024 keys/query', naming each stack when there are several."""
    ks = [
        f"{st.keys_per_query:,.0f}"
        + (f"+{st.cross_keys:,}" if st.cross_keys else "")
        + (f" ({st.name})" if len(stacks) > 1 else "")
        for st in stacks
    ]
    return f"k={', '.join(ks)} keys/query"


def estimate(w: Workload) -> list[Line]:
    """Every line of the per-GPU estimate; workers sharing one GPU add up."""
    lines = model_state_lines(w) + activation_lines(w)
    k = w.workers_per_gpu
    if k == 1:
        return lines
    return [replace(line, gpu=line.gpu * k, cpu=line.cpu * k) for line in lines]


def gpu_total(w: Workload) -> int:
    return sum(line.gpu for line in estimate(w))


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


def workload(spec: JobSpec) -> Workload:
    """The numbers of the estimate, from a validated spec (builds the model on meta)."""
    m, data, t, ds, r = spec.model, spec.data, spec.training, spec.deepspeed, spec.resources
    params, largest = _model_sizes(spec)
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
    return Workload(
        params=params,
        largest_module=largest,
        d_model=m.d_model,
        n_heads=m.n_heads,
        vocab_size=m.vocab_size,
        stacks=tuple(
            Stack(name, layers, s, keys_per_query(spec.attention, causal, m.n_heads, s), cross)
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


def _levers(w: Workload) -> list[list[Workload]]:
    """Each way to save GPU memory, as its settings from mildest to strongest."""
    valid_micro = [
        m
        for m in range(w.micro_batch - 1, 0, -1)
        # keep global_batch_size a multiple of micro_batch_size x num_workers
        if w.global_batch % (m * w.world_size) == 0
    ]
    return [
        [] if w.checkpointing else [replace(w, checkpointing=True)],
        [replace(w, zero_stage=s) for s in range(w.zero_stage + 1, 4)],
        []
        if w.offload_optimizer
        else [replace(w, zero_stage=max(w.zero_stage, 1), offload_optimizer=True)],
        [] if w.offload_params else [replace(w, zero_stage=3, offload_params=True)],
        [replace(w, micro_batch=m) for m in valid_micro],
    ]


def _overrides(before: Workload, after: Workload) -> tuple[str, ...]:
    """The spec overrides that turn one workload into the other."""
    fields = (
        ("training.activation_checkpointing", "checkpointing"),
        ("deepspeed.zero_stage", "zero_stage"),
        ("deepspeed.offload_optimizer", "offload_optimizer"),
        ("deepspeed.offload_params", "offload_params"),
        ("training.micro_batch_size", "micro_batch"),
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
    do together, taken in the order checkpointing, ZeRO stage, offloads, micro batch."""
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

    @property
    def gpu_total(self) -> int:
        return sum(line.gpu for line in self.lines)

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
                "offloads and micro batch 1: use a larger GPU or a shorter data.seq_len"
            )
        tries = " / ".join(
            f"{' '.join(s.overrides)} ({human(s.gpu_total)})" for s in self.suggestions
        )
        return f"{head}; try: {tries}"

    def to_json(self) -> dict[str, Any]:
        w = self.workload
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
                    "gpu_bytes": line.gpu,
                    "cpu_bytes": line.cpu,
                    "detail": line.detail,
                }
                for line in self.lines
            ],
            "gpu_total_bytes": self.gpu_total,
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
        }


def plan_job(spec: JobSpec, source: str = "<spec>") -> Plan:
    """The memory plan of a validated spec. `source` names the spec in error messages."""
    r = spec.resources
    gpu = find_gpu(r.gpu_type, source) if r.gpu_type is not None else None
    w = workload(spec)
    lines = tuple(estimate(w))
    total = sum(line.gpu for line in lines)
    fits = gpu is None or total <= gpu.memory
    found = tuple(suggestions(w, gpu.memory)) if gpu is not None and not fits else ()
    return Plan(spec.job.name, w, lines, gpu, found, _notes(spec, w, lines, gpu))


def _notes(spec: JobSpec, w: Workload, lines: tuple[Line, ...], gpu: GPU | None) -> tuple[str, ...]:
    r, notes = spec.resources, []
    if r.gpus_per_worker == 0:
        notes.append("resources.gpus_per_worker is 0 (a CPU run): planned as one GPU per worker")
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
    if spec.attention.backend in ("sdpa", "flex", "blocksparse"):
        scores = sum(line.gpu for line in lines if line.component == "attention scores")
        without = sum(line.gpu for line in lines) - scores
        would_fit = (
            f", which fits on {gpu.name}"
            if gpu is not None and without <= gpu.memory < without + scores
            else ""
        )
        notes.append(
            f"backend {spec.attention.backend!r} recomputes attention scores in the backward "
            "pass instead of storing them, so the 'attention scores' line is the paper's upper "
            f"bound; without it the total is {human(without)}{would_fit}"
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
    return (
        f"{plan.job}: {w.params:,} params, {w.precision}, ZeRO-{w.zero_stage}"
        f"{' + offload ' + offload if offload else ''}, {w.world_size} "
        f"worker{'s' if w.world_size != 1 else ''}{sharing}, micro batch {w.micro_batch} x "
        f"{lengths} tokens{', activation checkpointing' if w.checkpointing else ''}"
    )


def render(plan: Plan) -> None:
    """Print the plan: the job, a table of components with the total, the verdict, notes."""
    from rich.console import Console
    from rich.table import Table

    table = Table()
    table.add_column("component")
    table.add_column("per GPU", justify="right")
    table.add_column("CPU", justify="right")
    table.add_column("how")
    for line in plan.lines:
        table.add_row(line.component, human(line.gpu), human(line.cpu), line.detail)
    table.add_section()
    table.add_row("total", human(plan.gpu_total), human(plan.cpu_total), "")
    console = Console(highlight=False)
    # plain lines are never wrapped by rich, so they stay greppable
    console.print(headline(plan), soft_wrap=True, markup=False)
    console.print(table)
    console.print(plan.verdict(), soft_wrap=True, markup=False)
    for note in plan.notes:
        console.print(f"note: {note}", soft_wrap=True, markup=False)
