"""The job spec's component nodes: one typed node per component (job, data, model,
training, deepspeed, resources, tracking, storage, schedule, and the retrain, compare and
evaluate sections), each checking its own fields. `JobSpec` (pipeline/config/schema.py) joins
them and checks what spans nodes."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from models.config import PRESETS, FieldError, ModelConfig, Positional, _Node
from pipeline.config.cron import cron_trigger
from pipeline.presets import deepspeed_presets

JobKind = Literal["preprocess", "train", "evaluate", "retrain", "pipeline", "compare"]


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
        False,
        description="Load with datasets' streaming mode instead of loading it whole (a hub "
        "dataset, or files read on the driver: csv, a JSON array); JSON lines, parquet and "
        "text files, local or in a bucket, are read by the workers, a block each",
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


class ProbeNode(_Node):
    """`kind: compare` and `evaluate`: the long-range retrieval probe (pipeline/probe.py). A
    key opens each sequence; the model must repeat it after a marker `distances` tokens
    later. A probe-size model with each variant's (or evaluated model's) attention, and each
    sparse one's window alone, is trained on the task, then scored per distance."""

    enabled: bool = Field(True, description="Run the probe after the variants train")
    seq_len: int = Field(256, ge=16, description="Tokens per probe sequence scored")
    distances: list[int] = Field(
        default_factory=lambda: [24, 200],
        min_length=1,
        description="Tokens from the key to where it is asked for; each scored on its own",
    )
    train_seq_len: int | None = Field(
        None,
        ge=16,
        description="Tokens per training sequence (default: seq_len). A query's window and "
        "globals hold as many keys at any length, so a probe model trained short (with "
        "positional: none, which ties it to no length) retrieves at a long seq_len",
    )
    train_distances: list[int] | None = Field(
        None, min_length=1, description="The distances trained on (default: distances)"
    )
    positional: Positional = Field("rope", description="The probe model's position encoding")
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
        trained = self.train_distances or self.distances
        for field, distances, where, tokens in (
            ("distances", self.distances, "seq_len", self.seq_len),
            (
                "train_distances" if self.train_distances else "train_seq_len",
                trained,
                "train_seq_len" if self.train_seq_len else "seq_len",
                self.train_seq_len or self.seq_len,
            ),
        ):
            if any(d < 1 for d in distances):
                raise FieldError(field, f"each distance must be >= 1, got {distances}")
            need = 2 * self.key_tokens + max(distances)
            if need > tokens:
                raise FieldError(
                    field,
                    f"{max(distances)} + 2 x key_tokens ({self.key_tokens}) = {need} tokens "
                    f"do not fit {where}={tokens}",
                )
        if self.d_model % self.n_heads:
            raise FieldError(
                "d_model", f"{self.d_model} is not a multiple of n_heads={self.n_heads}"
            )
        return self


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
    probe: ProbeNode | None = Field(
        None,
        description="The long-range probe (as compare.probe; its variants key aside) on each "
        "model's own attention: pattern, parameters, backend, and its window alone",
    )


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


# Nodes that accept `preset: NAME`, and the named diffs they draw from.
PRESET_NODES: dict[str, dict[str, dict[str, Any]]] = {
    "model": PRESETS,
    "deepspeed": deepspeed_presets(),
}


def _known_preset(name: str | None, presets: dict[str, Any]) -> str | None:
    """A preset node's check: the name is one of its presets (with a close match if not)."""
    if name is not None and name not in presets:
        raise ValueError(
            f"unknown preset {name!r}{suggest(name, list(presets))}; known: {', '.join(presets)}"
        )
    return name


def suggest(word: str, choices: Sequence[str], prefix: Sequence[str] = ()) -> str:
    """` (did you mean 'prefix.match'?)` for the close match of `word` in `choices`, or ""."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not match:
        return ""
    return f" (did you mean {dotted([*prefix, match[0]])!r}?)"


def dotted(loc: Sequence[str]) -> str:
    """A YAML path as a user writes it: `data.sources[0].path`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out
