"""The job spec: a typed tree with one node per component (pipeline/config/nodes.py), and
the checks that span nodes. Each component receives only its own node (`spec.model`,
`spec.training`, ...). What a job kind needs beyond the schema (a compare job's variants,
an evaluate job's models) is the kind's own check (pipeline/kinds/)."""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence
from typing import Any, Union

from pydantic import BaseModel, Field, model_validator

from models.config import AttentionConfig, FieldError, ModelConfig, _Node
from pipeline.config.nodes import (
    CompareNode,
    DataNode,
    DeepSpeedNode,
    EvaluateNode,
    JobNode,
    ModelNode,
    ResourcesNode,
    RetrainNode,
    ScheduleNode,
    StorageNode,
    TrackingNode,
    TrainingNode,
)


class JobSpec(_Node):
    """The whole job: one node per component."""

    job: JobNode = Field(default_factory=JobNode, description="Name and kind of the job")
    data: DataNode = Field(
        default_factory=DataNode, description="Sources, cleaning, tokenizer and packing"
    )
    model: ModelNode = Field(
        default_factory=ModelNode, description="Architecture: a preset plus overrides"
    )
    attention: AttentionConfig = Field(
        default_factory=AttentionConfig, description="Attention pattern, backend and span"
    )
    training: TrainingNode = Field(
        default_factory=TrainingNode,
        description="Steps, batches, optimizer, precision, evaluation and checkpoints",
    )
    deepspeed: DeepSpeedNode = Field(
        default_factory=DeepSpeedNode, description="ZeRO stage and CPU offload"
    )
    resources: ResourcesNode = Field(
        default_factory=ResourcesNode, description="Training workers and what each one holds"
    )
    tracking: TrackingNode = Field(
        default_factory=TrackingNode,
        description="MLflow tracking and registration, attention heatmaps",
    )
    storage: StorageNode = Field(
        default_factory=StorageNode, description="Where the job writes its outputs"
    )
    schedule: ScheduleNode = Field(
        default_factory=ScheduleNode, description="A recurring schedule (`attnpipe schedule`)"
    )
    retrain: RetrainNode = Field(
        default_factory=RetrainNode, description="Challenger training and promotion (kind: retrain)"
    )
    compare: CompareNode = Field(
        default_factory=CompareNode, description="Variants to train and compare (kind: compare)"
    )
    evaluate: EvaluateNode = Field(
        default_factory=EvaluateNode,
        description="Models to score on held-out data (kind: evaluate)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        t, r = self.training, self.resources
        self._check_sequence_parallel()
        dp = self.data_parallel_size
        workers = (
            f"resources.num_workers ({r.num_workers})"
            if r.sequence_parallel == 1
            else f"data-parallel workers ({r.num_workers} / sequence_parallel "
            f"{r.sequence_parallel} = {dp})"
        )
        per_step = t.micro_batch_size * dp
        if t.global_batch_size % per_step:
            raise FieldError(
                "training.global_batch_size",
                f"{t.global_batch_size} is not a multiple of training.micro_batch_size "
                f"({t.micro_batch_size}) x {workers}",
            )
        if t.grad_accum_steps is not None and t.grad_accum_steps * per_step != t.global_batch_size:
            raise FieldError(
                "training.grad_accum_steps",
                f"{t.grad_accum_steps} x micro_batch_size {t.micro_batch_size} x {workers} "
                f"!= global_batch_size {t.global_batch_size}",
            )
        if t.lr_schedule.warmup_steps > t.steps:
            raise FieldError(
                "training.lr_schedule.warmup_steps",
                f"{t.lr_schedule.warmup_steps} exceeds training.steps={t.steps}",
            )
        m = self.model
        if m.positional in ("learned", "sinusoidal") and self.data.seq_len > m.max_seq_len:
            raise FieldError(
                "data.seq_len", f"{self.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}"
            )
        vocab = self.data.tokenizer.vocab_size
        if vocab is not None and vocab > m.vocab_size:
            raise FieldError(
                "data.tokenizer.vocab_size",
                f"{vocab} exceeds model.vocab_size={m.vocab_size}",
            )
        _check_attention(self.attention, m, self.data.seq_len)
        return self

    def _check_sequence_parallel(self) -> None:
        """sequence_parallel P splits each sequence over P workers and each layer's heads
        over the same P (Ulysses): P must divide the workers, the tokens a model sees per
        sample and the heads; key/value heads divide by P, or P by them (then each rank
        gets a copy of its group's key/value head)."""
        p, r = self.resources.sequence_parallel, self.resources
        if p == 1:
            return
        key = "resources.sequence_parallel"
        arch = self.model.architecture()
        if arch.family == "encoder_decoder":
            raise FieldError(
                key,
                f"{p}: sequence parallelism is for the decoder and the encoder; the "
                "encoder-decoder trains with sequence_parallel 1",
            )
        checks = [
            (r.num_workers, f"resources.num_workers ({r.num_workers})"),
            (self.data.seq_len, f"data.seq_len ({self.data.seq_len})"),
            (arch.n_heads, f"model.n_heads ({arch.n_heads})"),
        ]
        for value, what in checks:
            if value % p:
                raise FieldError(key, f"{p} does not divide {what}")
        kv = arch.kv_heads
        if kv % p and p % kv:
            raise FieldError(
                key,
                f"{p} and model.n_kv_heads ({kv}) must divide one another (each rank takes "
                "kv_heads / P key/value heads, or a copy of one)",
            )

    @property
    def data_parallel_size(self) -> int:
        """Groups of workers that each train on their own samples."""
        return self.resources.num_workers // self.resources.sequence_parallel

    @property
    def grad_accum_steps(self) -> int:
        t = self.training
        return t.global_batch_size // (t.micro_batch_size * self.data_parallel_size)


def spec_warnings(spec: JobSpec) -> list[str]:
    """Choices that run, but not as a user likely means them: one line each, naming the key.
    (Errors are raised by validation; these are for `attnpipe validate` and the other
    commands to print.)"""
    out = []
    backends = {"attention.backend": spec.attention.backend}
    for name, tree in spec.compare.variants.items():
        backend = (tree.get("attention") or {}).get("backend")
        if backend:
            backends[f"compare.variants.{name}.attention.backend"] = backend
    if spec.resources.gpus_per_worker > 0:
        for key, backend in backends.items():
            if backend == "blocksparse":
                out.append(
                    f"{key}: blocksparse on GPUs launches about 20 small kernels per (batch, "
                    "head, chunk, layer) and upcasts bf16 to fp32; 'flex' (FlexAttention, "
                    "compiled) is the training backend on CUDA"
                )
    if spec.training.precision == "bf16" and spec.deepspeed.zero_stage == 0:
        out.append(
            "deepspeed.zero_stage: 0 with bf16 runs DeepSpeed's stage 1 (its BF16_Optimizer: "
            "fp32 master weights and gradient accumulation, optimizer state partitioned "
            "over data-parallel ranks); DeepSpeed 0.19 has no fp32 accumulation at stage 0"
        )
    return out


def _check_attention(attn: AttentionConfig, model: ModelConfig, seq_len: int) -> None:
    """The pattern and backend exist, take these parameters, fit the sequence length and
    work with the model: the checks the model makes at construction, made before any run."""
    from models.attention import AttentionSpecError, make_pattern
    from models.transformer import build_model

    causal = model.family != "encoder"
    try:
        make_pattern(attn.pattern, causal=causal, **attn.params).validate(seq_len)
    except AttentionSpecError as exc:
        field = (
            "attention.pattern" if "unknown attention pattern" in str(exc) else "attention.params"
        )
        raise FieldError(field, str(exc)) from None
    try:
        import torch

        with torch.device("meta"):  # construction only: no memory, no initialisation
            build_model(ModelConfig(**model.model_dump(exclude={"preset"})), attn)
    except AttentionSpecError as exc:
        message = str(exc)
        fields = {
            "adaptive_span": "attention.adaptive_span",
            "dropout": "model.dropout",
            "alibi": "model.positional",
            "head layouts": "attention.params",
        }
        field = next((f for key, f in fields.items() if key in message), "attention.backend")
        raise FieldError(field, message) from None


# --------------------------------------------------------------------------- walking the schema


def all_paths(cls: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of the node `cls`, sections before the keys below them."""
    out: list[tuple[str, ...]] = []
    for name, field in cls.model_fields.items():
        path = (*prefix, name)
        out.append(path)
        child = node_type(field.annotation)
        if is_node(child):
            out += all_paths(child, path)
    return out


def fields_at(loc: Sequence[str]) -> list[str]:
    """The field names of the config node at `loc` (list indices skipped)."""
    cls: Any = JobSpec
    for part in loc:
        if part.isdigit():
            continue
        field = cls.model_fields.get(part) if is_node(cls) else None
        if field is None:
            return []
        cls = node_type(field.annotation)
    return list(cls.model_fields) if is_node(cls) else []


def is_node(cls: Any) -> bool:
    """Whether `cls` is a section of the spec (a node class) rather than a value type."""
    return isinstance(cls, type) and issubclass(cls, BaseModel)


def node_type(annotation: Any) -> Any:
    """Unwrap Optional[...] and list[...] down to a config node class, if there is one."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            found = node_type(arg)
            if is_node(found):
                return found
    return annotation
