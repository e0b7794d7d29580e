"""The job spec: a typed tree with one node per component, loaded from YAML.

Precedence, lowest first: the nodes' defaults < a named preset (`model.preset`) < the job
file < `key.path=value` overrides from the command line. Unknown keys are rejected with a
close-match suggestion; every problem becomes one `SpecError` line that names the file, the
YAML path and, where it came from the file, the line.

Each component receives only its own node (`spec.model`, `spec.training`, ...).
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from models.config import PRESETS, AttentionConfig, FieldError, ModelConfig, _Node
from pipeline.errors import UserError
from pipeline.presets import deepspeed_presets

JobKind = Literal["preprocess", "train", "evaluate", "retrain", "pipeline", "compare"]


class SpecError(UserError):
    """A job spec cannot be used; the message is one line naming what and where."""


# --------------------------------------------------------------------------- nodes


class JobNode(_Node):
    name: str = Field(
        "attnpipe-job",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
        description="Names the data folder, runs, MLflow run and default registered model",
    )
    kind: JobKind = Field(
        "train",
        description="preprocess, train, pipeline (both), evaluate, retrain or compare",
    )
    description: str = Field("", description="Free text about the job; logged with the params")


class SourceNode(_Node):
    """One text source. `demo` is the bundled offline corpus; `hub` a dataset by name;
    `files` local or remote files by path or glob."""

    kind: Literal["demo", "hub", "files"] = Field(
        "demo", description="demo (bundled Shakespeare), hub (Hugging Face dataset) or files"
    )
    name: str | None = Field(None, description="Hub dataset name (kind: hub)")
    config: str | None = Field(None, description="Hub dataset configuration (kind: hub)")
    split: str = Field("train", description="Hub dataset split to read (kind: hub)")
    path: str | None = Field(
        None, description="File path or glob, `**` recursive, local or s3:// / gs:// (kind: files)"
    )
    format: Literal["text", "json", "jsonl", "parquet", "csv"] | None = Field(
        None,
        description="File format (kind: files); default: the first file's extension; "
        "text: a document per file",
    )
    text_column: str = Field("text", description="Column holding the text (hub, files)")
    target_column: str | None = Field(
        None, description="Column holding the target text of paired (encoder_decoder) data"
    )
    weight: float = Field(
        1.0,
        gt=0,
        description="Blend weight: 2 reads the source twice, 0.5 half its documents (by hash)",
    )
    streaming: bool = Field(
        False, description="Load with datasets' streaming mode instead of loading it whole"
    )
    documents: Literal["scenes", "plays"] = Field(
        "scenes",
        description="kind: demo: a document per scene (257-43,143 characters, median 5,106) "
        "or per whole play (87,000-176,000 characters), for long context; paired data always "
        "pairs lines within a scene",
    )

    @model_validator(mode="after")
    def _where(self) -> SourceNode:
        if self.documents != "scenes" and self.kind != "demo":
            raise FieldError("documents", "only the demo corpus has scenes and plays")
        if self.kind == "hub" and not self.name:
            raise FieldError("name", "a hub source needs a dataset name")
        if self.kind == "files" and not self.path:
            raise FieldError("path", "a files source needs a path or glob")
        return self


class TokenizerNode(_Node):
    vocab_size: int | None = Field(
        None,
        ge=256,
        le=1_000_000,
        description="Vocabulary of the BPE to train, at most model.vocab_size; "
        "default: model.vocab_size",
    )
    path: str | None = Field(
        None, description="A tokenizer.json to load instead of training a byte-level BPE"
    )
    sample_documents: int = Field(
        100_000, ge=1, description="Documents the BPE is trained on: the first ones kept"
    )


class DataNode(_Node):
    sources: list[SourceNode] = Field(
        default_factory=lambda: [SourceNode()],
        min_length=1,
        description="Text sources, blended by their weights",
    )
    seq_len: int = Field(
        256, ge=8, description="Tokens per sample; documents are packed into seq_len + 1 tokens"
    )
    tokenizer: TokenizerNode = Field(
        default_factory=TokenizerNode, description="The tokenizer: trained on the data or loaded"
    )
    val_fraction: float = Field(
        0.01,
        gt=0.0,
        le=0.5,
        description="Fraction of documents in the validation split, chosen by content hash",
    )
    samples_per_shard: int = Field(4096, ge=1, description="Packed samples per .npy shard")
    min_chars: int = Field(
        1, ge=0, description="Drop documents shorter than this, in characters after normalising"
    )
    max_chars: int | None = Field(
        None, ge=1, description="Drop documents longer than this, in characters; null: no limit"
    )
    dedup: bool = Field(True, description="Drop exact duplicate documents, keeping the first")
    max_source_len: int | None = Field(
        None, ge=1, description="Paired data: source tokens per sample (truncated); default seq_len"
    )
    max_target_len: int | None = Field(
        None, ge=1, description="Paired data: target tokens per sample (truncated); default seq_len"
    )
    seed: int = Field(
        0,
        description="Unused by preprocessing (splits go by hash); only changes the fingerprint",
    )

    @model_validator(mode="after")
    def _lengths(self) -> DataNode:
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise FieldError("max_chars", f"{self.max_chars} is below min_chars={self.min_chars}")
        return self


class ModelNode(ModelConfig):
    """The model's architecture: an optional named preset plus field overrides."""

    preset: str | None = Field(
        None,
        description="Named size preset (see `attnpipe models`); this node's keys override it",
    )

    @field_validator("preset")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        return _known_preset(v, PRESETS)

    def architecture(self) -> ModelConfig:
        """The plain ModelConfig the models package builds from."""
        return ModelConfig(**self.model_dump(exclude={"preset"}))


class OptimizerNode(_Node):
    name: Literal["adamw"] = Field("adamw", description="The optimizer; AdamW only")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate, reached after warmup")
    betas: tuple[float, float] = Field(
        (0.9, 0.95), description="AdamW's decay rates of the gradient moments (beta1, beta2)"
    )
    eps: float = Field(1e-8, gt=0, description="AdamW's epsilon, added to the denominator")
    weight_decay: float = Field(0.1, ge=0, description="AdamW's decoupled weight decay")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"each beta must be in [0, 1), got {list(v)}")
        return v


class ScheduleLRNode(_Node):
    name: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warmup: cosine, linear, or constant (no decay)"
    )
    warmup_steps: int = Field(100, ge=0, description="Steps of linear warmup from 0 to lr")
    min_lr_ratio: float = Field(
        0.1, ge=0.0, le=1.0, description="Learning rate at the last step, as a fraction of lr"
    )


class TrainingNode(_Node):
    steps: int = Field(1000, ge=1, description="Optimizer steps to train")
    global_batch_size: int = Field(
        32, ge=1, description="Samples per optimizer step, over all workers and micro batches"
    )
    micro_batch_size: int = Field(
        8, ge=1, description="Samples per worker in one forward and backward pass"
    )
    grad_accum_steps: int | None = Field(
        None,
        ge=1,
        description="Micro batches per step; if set, must be "
        "global_batch_size / (micro_batch_size * data-parallel workers)",
    )
    optimizer: OptimizerNode = Field(
        default_factory=OptimizerNode, description="The optimizer and its settings"
    )
    lr_schedule: ScheduleLRNode = Field(
        default_factory=ScheduleLRNode, description="Learning-rate schedule: warmup, then decay"
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="fp32, or bf16 / fp16 mixed precision (DeepSpeed)"
    )
    grad_clip: float = Field(
        1.0, ge=0, description="Clip the global gradient norm to this; 0: no clipping"
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each block's activations in the backward pass (less memory)"
    )
    loss_chunk_tokens: int | None = Field(
        None,
        ge=1,
        description="Tokens per chunk of the LM head and cross-entropy, each recomputed in the "
        "backward pass: the (batch, seq, vocab) logits are never built; none: all at once",
    )
    mlp_chunk_tokens: int | None = Field(
        None,
        ge=1,
        description="Tiled MLP: tokens per chunk of each block's feed-forward, recomputed in the "
        "backward pass (for very long sequences); none: the whole sequence at once",
    )
    checkpoint_interval: int = Field(
        500, ge=1, description="Save a checkpoint every this many steps, and at the end"
    )
    keep_checkpoints: int = Field(3, ge=1, description="Newest checkpoints kept per run")
    eval_interval: int = Field(
        200, ge=1, description="Evaluate and draw heatmaps every this many steps, and at the end"
    )
    eval_batches: int = Field(
        20,
        ge=1,
        description="Validation micro batches per worker at each evaluation (at most); a "
        "sequence-parallel group of P workers evaluates P times as many, the same samples",
    )
    log_interval: int = Field(
        10, ge=1, description="Log training metrics every this many steps, and at the end"
    )
    seed: int = Field(0, description="Seed of the initial weights, data order and MLM masking")
    document_masking: bool = Field(
        True, description="Packed samples: a token attends only within its own document"
    )
    mlm_probability: float = Field(
        0.15, gt=0.0, lt=1.0, description="Fraction of tokens masked by the encoder's masked LM"
    )
    max_failures: int = Field(
        0,
        ge=-1,
        description="Worker failures to recover from by resuming a checkpoint (-1: no limit)",
    )
    peak_flops: float | None = Field(
        None,
        gt=0,
        description="Per-device peak FLOP/s for MFU; default: the GPU table or a measured matmul",
    )


class DeepSpeedNode(_Node):
    """ZeRO stage and offload: set directly, or by a named preset (`preset: zero3-offload`,
    the files in pipeline/presets/deepspeed/, copied in infra/deepspeed/)."""

    preset: str | None = Field(
        None,
        description="zero1, zero2, zero3 or zero3-offload; this node's keys override it",
    )
    zero_stage: int = Field(
        0,
        ge=0,
        le=3,
        description="ZeRO stage: 0 off; partitions 1 optimizer states, 2 + gradients, 3 + params",
    )
    offload_optimizer: bool = Field(
        False, description="Optimizer states and step on the CPU; needs zero_stage 1-3"
    )
    offload_params: bool = Field(False, description="Parameters on the CPU; needs zero_stage 3")

    @field_validator("preset")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        return _known_preset(v, deepspeed_presets())

    @model_validator(mode="after")
    def _offload(self) -> DeepSpeedNode:
        if self.offload_params and self.zero_stage != 3:
            raise FieldError("offload_params", f"needs zero_stage 3, got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise FieldError("offload_optimizer", "needs zero_stage 1, 2 or 3")
        return self


class ResourcesNode(_Node):
    num_workers: int = Field(2, ge=1, description="Training workers (Ray Train)")
    sequence_parallel: int = Field(
        1,
        ge=1,
        description="Workers that share each sequence (Ulysses sequence parallelism): groups "
        "of this many consecutive ranks, each holding a slice; data-parallel size = "
        "num_workers / sequence_parallel",
    )
    gpus_per_worker: float = Field(
        0, ge=0, description="GPUs per worker; 0: train on CPU (gloo), else on GPU (NCCL)"
    )
    cpus_per_worker: float = Field(
        1, gt=0, description="CPUs per worker; also its torch thread count"
    )
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement strategy of the workers across nodes"
    )
    gpu_type: str | None = Field(
        None, description='GPU the memory planner checks against, e.g. "H100-80GB"'
    )


class TrackingNode(_Node):
    uri: str | None = Field(
        None, description="MLflow tracking URI; default: `sqlite:///<work_dir>/mlflow.db`"
    )
    experiment: str = Field("attnpipe", min_length=1, description="MLflow experiment name")
    register_name: str | None = Field(
        None, description="Registered model the trained model goes to; default: job.name"
    )
    log_checkpoints: Literal["all", "last", "none"] = Field(
        "last", description="Checkpoints logged to MLflow as artifacts at the end of training"
    )
    buffer_size: int = Field(
        10_000,
        ge=1,
        description="Metric points queued for MLflow; when full, the oldest are dropped",
    )
    system_metrics: bool = Field(True, description="Log MLflow's system metrics (CPU, GPU, memory)")
    heatmap_layers: list[int] = Field(
        default_factory=lambda: [0, -1],
        description="Layers whose attention is drawn at each evaluation (-1: last)",
    )
    heatmap_heads: list[int] = Field(
        default_factory=lambda: [0, 1],
        description="Heads drawn in each layer (>= n_heads: skipped)",
    )
    heatmap_tokens: int = Field(
        40, ge=0, le=256, description="Tokens of the validation snippet drawn; 0: no heatmaps"
    )


class RetrainNode(_Node):
    """`kind: retrain`: how a challenger is trained and when it replaces the champion."""

    warm_start: bool = Field(
        True, description="Start the challenger from the champion's weights, not from scratch"
    )
    margin: float = Field(
        0.0, ge=0.0, description="Fraction of the champion's held-out loss to beat it by"
    )
    eval_batches: int = Field(
        20, ge=1, description="Validation batches of 8 samples both models are scored on"
    )


class EvaluateNode(_Node):
    """`kind: evaluate`: score trained models on held-out data: loss, perplexity and bits
    per byte per split, a few generated samples; linked to each model version."""

    models: list[str] = Field(
        default_factory=list,
        description="The models scored: models:/name@alias, models:/name/3, an MLflow run id, "
        "a checkpoint folder, a folder of checkpoints or an exported folder",
    )
    data: str | None = Field(
        None,
        description="A preprocessed output (folder or s3:// / gs:// URI) tokenized with the "
        "models' tokenizer; default: this spec's data node, preprocessed with each model's",
    )
    splits: list[Literal["train", "val"]] = Field(
        default_factory=lambda: ["val"], min_length=1, description="The splits scored"
    )
    batches: int | None = Field(
        20, ge=1, description="Batches scored per split, the same for every model; null: all"
    )
    batch_size: int = Field(8, ge=1, description="Samples per evaluation batch")
    samples: int = Field(
        3, ge=0, le=32, description="Validation prompts each model continues (an MLflow table)"
    )
    prompt_tokens: int = Field(16, ge=1, description="Tokens of each sample's prompt")
    sample_tokens: int = Field(32, ge=1, description="Tokens each sample generates (greedy)")
    seed: int = Field(0, description="Seed of the masked-LM corruption (encoder models)")


class ProbeNode(_Node):
    """`kind: compare`: the long-range retrieval probe (pipeline/probe.py). A key opens each
    sequence; the model must repeat it after a marker `distances` tokens later. A probe-size
    model with each variant's attention (and each sparse variant's window alone) is trained
    on the task, then scored per distance."""

    enabled: bool = Field(True, description="Run the probe after the variants train")
    seq_len: int = Field(256, ge=16, description="Tokens per probe sequence")
    distances: list[int] = Field(
        default_factory=lambda: [24, 200],
        min_length=1,
        description="Tokens from the key to where it is asked for; each scored on its own",
    )
    key_tokens: int = Field(4, ge=1, le=16, description="Symbols in the key")
    symbols: int = Field(16, ge=2, le=256, description="Key alphabet size (chance: 1/symbols)")
    d_model: int = Field(64, ge=8, description="Width of the probe model")
    n_layers: int = Field(2, ge=1, description="Layers of the probe model")
    n_heads: int = Field(4, ge=1, description="Attention heads of the probe model")
    steps: int = Field(300, ge=1, description="Training steps per probe model")
    batch_size: int = Field(16, ge=1, description="Sequences per probe training step")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of the probe models")
    seed: int = Field(0, description="Seed of the probe models and their sequences")
    variants: list[str] | None = Field(
        None,
        min_length=1,
        description="The variants probed (default: all); at 8K tokens a dense probe model "
        "costs several times a sparse one on a CPU",
    )
    window_only: bool = Field(
        True, description="Also probe each sparse variant's window alone (no globals, no random)"
    )

    @model_validator(mode="after")
    def _fits(self) -> ProbeNode:
        if any(d < 1 for d in self.distances):
            raise FieldError("distances", f"each distance must be >= 1, got {self.distances}")
        need = 2 * self.key_tokens + max(self.distances)
        if need > self.seq_len:
            raise FieldError(
                "distances",
                f"{max(self.distances)} + 2 x key_tokens ({self.key_tokens}) = {need} tokens "
                f"do not fit seq_len={self.seq_len}",
            )
        if self.d_model % self.n_heads:
            raise FieldError(
                "d_model", f"{self.d_model} is not a multiple of n_heads={self.n_heads}"
            )
        return self


class CompareNode(_Node):
    """`kind: compare`: named variants, each a tree of overrides on this spec (for example
    `{attention: {pattern: bigbird, backend: blocksparse}}`), trained on the same data."""

    variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Variant name to overrides of this spec (not data or job); at least two",
    )
    probe: ProbeNode = Field(
        default_factory=ProbeNode, description="The long-range retrieval probe of each variant"
    )

    @model_validator(mode="after")
    def _no_data(self) -> CompareNode:
        for name, tree in self.variants.items():
            if "data" in tree or "job" in tree:
                raise FieldError(
                    f"compare.variants.{name}", "variants share the job's data and job nodes"
                )
        unknown = [v for v in self.probe.variants or [] if v not in self.variants]
        if unknown and self.variants:
            raise FieldError(
                "compare.probe.variants",
                f"{unknown[0]!r} is not a variant (have {list(self.variants)})",
            )
        return self


class StorageNode(_Node):
    work_dir: str = Field(
        "attnpipe-work",
        min_length=1,
        description="Folder for data shards, runs, checkpoints and the local MLflow store",
    )
    data: str | None = Field(
        None,
        min_length=1,
        description="Where preprocessed data lives, `<data>/<job name>`: a folder, or a URI "
        "(s3://bucket/prefix, gs://bucket/prefix) that every node of a cluster reads; "
        "credentials come from the environment. Default: `<work_dir>/data`",
    )

    @field_validator("data")
    @classmethod
    def _data(cls, v: str | None) -> str | None:
        from pipeline.data.remote import check_uri, is_uri

        reason = check_uri(v) if v is not None and is_uri(v) else ""
        if reason:
            raise ValueError(f"{v}: {reason}")
        return v


class ScheduleNode(_Node):
    cron: str | None = Field(
        None,
        description="Crontab expression (5 fields, or 6 seconds first) for `attnpipe schedule`",
    )
    timezone: str = Field("UTC", description="IANA time zone the cron expression is read in")

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {v!r}") from None
        return v

    @model_validator(mode="after")
    def _cron(self) -> ScheduleNode:
        if self.cron is not None:
            try:
                cron_trigger(self.cron, self.timezone)
            except ValueError as exc:
                raise FieldError("cron", f"invalid cron expression {self.cron!r}: {exc}") from None
        return self


_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def cron_trigger(expr: str, timezone: str = "UTC") -> Any:
    """An APScheduler CronTrigger for a crontab expression: `minute hour day month weekday`,
    or six fields with seconds first. Weekday numbers mean what they mean to cron (0 and 7
    are Sunday); APScheduler 3 counts from Monday, so they are passed as names."""
    from apscheduler.triggers.cron import CronTrigger

    fields = expr.split()
    if len(fields) not in (5, 6):
        raise ValueError(
            f"expected 5 fields (minute hour day month weekday) or 6 (seconds first), "
            f"got {len(fields)}"
        )
    second = fields[0] if len(fields) == 6 else "0"
    minute, hour, day, month, weekday = fields[-5:]
    return CronTrigger(
        second=second,
        minute=minute,
        hour=hour,
        day=day,
        month=month,
        day_of_week=_cron_weekdays(weekday),
        timezone=timezone,
    )


def _cron_weekdays(field: str) -> str:
    """Cron's numeric weekdays (`1-5`, `0,6`, `*/2`) as day names; names pass through."""
    if field == "*" or any(c.isalpha() for c in field):
        return field
    days: list[str] = []
    for part in field.split(","):
        base, _, step = part.partition("/")
        first, _, last = base.partition("-")
        try:
            lo, hi = (0, 6) if base == "*" else (int(first), int(last or (7 if step else first)))
            stride = int(step or 1)
        except ValueError:
            raise ValueError(f"day of week: cannot read {part!r}") from None
        if not (0 <= lo <= hi <= 7) or stride < 1:
            raise ValueError(f"day of week: {part!r} is outside 0-7 (0 and 7 are Sunday)")
        days += [_CRON_DAYS[d % 7] for d in range(lo, hi + 1, stride)]
    return ",".join(dict.fromkeys(days))


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
        if self.job.kind == "evaluate" and not self.evaluate.models:
            raise FieldError("evaluate.models", "an evaluate job needs at least one model")
        if self.job.kind == "compare":
            if len(self.compare.variants) < 2:
                raise FieldError("compare.variants", "a compare job needs at least two variants")
            from pipeline.compare import variant_specs

            variant_specs(self)  # each variant must be a valid job
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


# Nodes that accept `preset: NAME`, and the named diffs they draw from.
PRESET_NODES: dict[str, dict[str, dict[str, Any]]] = {
    "model": PRESETS,
    "deepspeed": deepspeed_presets(),
}


def _known_preset(name: str | None, presets: dict[str, Any]) -> str | None:
    """A preset node's check: the name is one of its presets (with a close match if not)."""
    if name is not None and name not in presets:
        raise ValueError(
            f"unknown preset {name!r}{_suggest(name, list(presets))}; known: {', '.join(presets)}"
        )
    return name


# --------------------------------------------------------------------------- loading


def load_spec(path: str | Path | None, overrides: Sequence[str] = ()) -> JobSpec:
    """Read, merge and validate a job spec. Raises SpecError with one line on bad input."""
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}
    if path is not None:
        raw, lines = _read_yaml(Path(path))
        origins = {key: f"{source}:{line}" for key, line in lines.items()}
    for item in overrides:
        key = _apply_override(raw, item)
        origins = {k: v for k, v in origins.items() if k[: len(key)] != key}
        origins[key] = f"{source}: override {item!r}" if path is not None else f"override {item!r}"
    return validate_spec(_apply_presets(raw), source, origins)


def validate_spec(
    raw: dict[str, Any], source: str = "<spec>", origins: dict[tuple[str, ...], str] | None = None
) -> JobSpec:
    """A JobSpec from an already merged dict (for example, a resolved spec sent to a worker).

    `origins` maps a YAML path to where its value came from (`file:line`, an override).
    """
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_describe(exc, source, origins or {})) from None


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a directory, not a job spec") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read: {exc}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{where}: malformed YAML: {problem}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a job spec is a mapping of sections, got {type(data).__name__}")
    return data, _line_index(node)


def _line_index(node: yaml.Node | None, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """{YAML path: 1-based line} for every key in the document."""
    index: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = (*prefix, str(key.value))
            index[path] = key.start_mark.line + 1
            index.update(_line_index(value, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            path = (*prefix, str(i))
            index[path] = value.start_mark.line + 1
            index.update(_line_index(value, path))
    return index


def _apply_override(raw: dict[str, Any], item: str) -> tuple[str, ...]:
    """Set `a.b.c=value` in place and return its path; the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise SpecError(f"override {item!r}: expected key.path=value, e.g. training.lr=3e-4")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node: Any = raw
    for i, part in enumerate(parts):
        where = ".".join(parts[: i + 1])
        last = i == len(parts) - 1
        if isinstance(node, list):  # `data.sources.0.path=...` indexes a list
            if not part.isdigit() or int(part) >= len(node):
                raise SpecError(f"override {item!r}: {where}: no such list item")
            if last:
                node[int(part)] = value
            node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            node = node.setdefault(part, {})
        else:
            raise SpecError(f"override {item!r}: {'.'.join(parts[:i])} is a value, not a section")
    return tuple(parts)


def _apply_presets(raw: dict[str, Any]) -> dict[str, Any]:
    """Expand `preset: NAME` under each preset node: the preset's diff, then the file's keys."""
    merged = dict(raw)
    for node, presets in PRESET_NODES.items():
        section = merged.get(node)
        if isinstance(section, dict) and section.get("preset") in presets:
            merged[node] = {**presets[section["preset"]], **section}
    return merged


# --------------------------------------------------------------------------- errors


def _describe(exc: ValidationError, source: str, origins: dict[tuple[str, ...], str]) -> str:
    """One line for the first error: `where: yaml.path: what is wrong`, where `where` is the
    file and line, or the override, that set the value (or its closest enclosing section)."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        # A node's check names its own field; a spec-level check names a full path.
        loc = cause.field.split(".") if "." in cause.field else [*loc, cause.field]
        message = str(cause)
    elif err["type"] == "extra_forbidden":
        message = "unknown key" + _suggest_key(loc)
    else:
        message = _humanize(err)
    # The value itself, a key set below it (an override `a.b.c=` on a scalar `a.b`), or the
    # closest enclosing section.
    below = (k for k in origins if k[: len(loc)] == tuple(loc))
    prefixes = (tuple(loc[:n]) for n in range(len(loc), 0, -1))
    where = next((origins[p] for p in (*below, *prefixes) if p in origins), source)
    return f"{where}: {_dotted(loc) or '(top level)'}: {message}"


def _humanize(err: dict[str, Any]) -> str:
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] in ("missing",):
        return "required"
    value = err.get("input")
    if isinstance(value, (dict, list)) or value is None:
        return msg
    shown = repr(value)
    if shown in msg:
        return msg
    return f"{msg} (got {shown if len(shown) <= 60 else shown[:57] + '...'})"


def _dotted(loc: Sequence[str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def _suggest_key(loc: Sequence[str]) -> str:
    """A close match among the siblings of an unknown key, else anywhere in the spec."""
    parent, key = loc[:-1], loc[-1]
    local = _suggest(key, _fields_at(parent), parent)
    if local:
        return local
    paths = _all_paths(JobSpec)
    match = difflib.get_close_matches(
        key, list(dict.fromkeys(p[-1] for p in paths)), n=1, cutoff=0.75
    )
    if not match:
        return ""

    def shared(path: tuple[str, ...]) -> int:  # the leaf nearest the unknown key wins
        pairs = zip(path, parent, strict=False)
        return next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(path), len(parent)))

    same_leaf = [p for p in paths if p[-1] == match[0]]
    best = max(same_leaf, key=lambda p: (shared(p), -same_leaf.index(p)))
    return f" (did you mean {'.'.join(best)!r}?)"


def _all_paths(cls: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for name, field in cls.model_fields.items():
        path = (*prefix, name)
        out.append(path)
        child = _node_type(field.annotation)
        if _is_node(child):
            out += _all_paths(child, path)
    return out


def _fields_at(loc: Sequence[str]) -> list[str]:
    """The field names of the config node at `loc` (list indices skipped)."""
    cls: Any = JobSpec
    for part in loc:
        if part.isdigit():
            continue
        field = cls.model_fields.get(part) if _is_node(cls) else None
        if field is None:
            return []
        cls = _node_type(field.annotation)
    return list(cls.model_fields) if _is_node(cls) else []


def _is_node(cls: Any) -> bool:
    return isinstance(cls, type) and issubclass(cls, BaseModel)


def _node_type(annotation: Any) -> Any:
    """Unwrap Optional[...] and list[...] down to a config node class, if there is one."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            found = _node_type(arg)
            if _is_node(found):
                return found
    return annotation


def _suggest(word: str, choices: Sequence[str], prefix: Sequence[str] = ()) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not match:
        return ""
    return f" (did you mean {_dotted([*prefix, match[0]])!r}?)"


def resolved_yaml(spec: JobSpec) -> str:
    """The resolved spec as YAML, as written next to a run and logged to MLflow."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
