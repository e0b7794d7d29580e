"""The loop every Ray Train worker runs: a model from models/, a DeepSpeed engine, the
deterministic shard reader, evaluation, checkpoints and (rank 0) metrics to MLflow.

The loop is written so that a run interrupted at any checkpoint and resumed ends with the
same weights, bit for bit on CPU, as a run never interrupted: the data order is a function
of (seed, samples consumed), the masked-LM corruption of (seed, step, rank), and each rank's
RNG states travel in the checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import signal
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import JobSpec, validate_spec
from pipeline.data.reader import ShardReader
from pipeline.data.remote import local_copy
from pipeline.data.shards import read_manifest
from pipeline.train.checkpoint import (
    DS_TAG,
    checkpoint_name,
    latest_complete,
    read_meta,
    read_rank_state,
    rng_state,
    set_rng_state,
    write_meta,
    write_rank_state,
)
from pipeline.train.deepspeed_config import LRSchedule, deepspeed_config
from pipeline.train.flops import DevicePeak, train_flops_per_token
from pipeline.train.objectives import Objective
from pipeline.train.ops import CPU_WORKER_ENV
from pipeline.train.zero import share_master_weights


@dataclass
class WorkerConfig:
    """What the driver hands every worker (plain data: it travels through Ray)."""

    spec: dict[str, Any]
    data_dir: str
    run_dir: str  # the Ray Train run folder: checkpoints and events.jsonl
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    resume_from: str | None = None  # a complete checkpoint folder
    faults: dict[str, Any] = field(default_factory=dict)  # fault injection, for tests only
    init_from: str | None = None  # an exported model whose weights a fresh run starts from


def quiet_worker_logs() -> None:
    """attnpipe prints progress itself: keep Ray Train's per-report lines and the
    deprecation notices DeepSpeed's collectives raise out of the job's output."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)  # Ray names it by file
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train

    quiet_worker_logs()
    ctx = ray.train.get_context()
    local_rank = ctx.get_local_rank()
    if torch.cuda.is_available():  # the GPU Ray Train assigned to this worker
        from ray.train.torch import get_device

        local_rank = get_device().index or 0
        torch.cuda.set_device(local_rank)
    worker = Worker(WorkerConfig(**config), ctx.get_world_rank(), ctx.get_world_size(), local_rank)
    worker.run()


class Worker:
    """One data-parallel rank. Ray Train supplies rank and world size; a benchmark or a test
    can build one in a process where torch.distributed is already initialised."""

    def __init__(self, cfg: WorkerConfig, rank: int, world: int, local_rank: int = 0) -> None:
        self.cfg = cfg
        self.spec: JobSpec = validate_spec(cfg.spec, "<resolved spec>")
        self.rank, self.world = rank, world
        self.device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(self.spec.resources.cpus_per_worker)))
        self.data_dir = local_copy(cfg.data_dir)  # a URI: this node's mirror of it
        self.manifest = read_manifest(self.data_dir)
        self.events = Path(cfg.run_dir) / "events.jsonl"
        self.metrics = None
        # sequence parallelism: groups of sp_size consecutive ranks share each sample; the
        # data-parallel rank (which samples) is the group's
        self.sp_size = self.spec.resources.sequence_parallel
        self.dp_rank, self.dp_world = rank // self.sp_size, world // self.sp_size
        self.sp: Any = None  # models.parallel.SequenceParallel, made in build()

    # ------------------------------------------------------------------ set-up

    def build(self) -> None:
        import deepspeed

        from models.attention.adaptive_span import span_modules
        from models.parallel import sequence_groups, set_sequence_parallel
        from models.transformer import (
            build_model,
            set_activation_checkpointing,
            set_loss_chunking,
            set_mlp_chunking,
        )

        self.sp = sequence_groups(self.sp_size)  # every rank creates every group
        spec, t = self.spec, self.spec.training
        torch.manual_seed(t.seed)  # the same initial weights on every rank
        model = build_model(spec.model.architecture(), spec.attention)
        if self.cfg.init_from:  # warm start; a resume then overrides it
            model.load_state_dict(_exported_weights(self.cfg.init_from))
        set_activation_checkpointing(model, t.activation_checkpointing)
        set_loss_chunking(model, t.loss_chunk_tokens)
        set_mlp_chunking(model, t.mlp_chunk_tokens)
        set_sequence_parallel(model, self.sp)
        self.spans = span_modules(model)
        named = list(model.named_parameters())
        decay = [(n, p) for n, p in named if p.dim() >= 2]
        no_decay = [(n, p) for n, p in named if p.dim() < 2]
        groups = [
            {"params": [p for _, p in decay]},
            {"params": [p for _, p in no_decay], "weight_decay": 0.0},
        ]
        # the names behind the optimizer's groups, for export to find fp32 master copies
        self.param_groups = [[n for n, _ in decay], [n for n, _ in no_decay]]
        schedule = LRSchedule(t.lr_schedule, t.steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=groups,
            config=deepspeed_config(spec, self.world),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            dist_init_required=False,
        )
        share_master_weights(self.engine.optimizer)  # fp32 ZeRO: no second copy of the weights
        if self.world == 1 and self.engine.zero_optimization_stage() == 0:
            # one rank: DeepSpeed's gradient all-reduce would copy every gradient into a
            # flat buffer, average it over one rank and copy it back, for nothing
            self.engine.enable_backward_allreduce = False
        self.accum = self.engine.gradient_accumulation_steps()
        # ZeRO-0 in fp32 steps the plain torch optimizer, which keeps no gradient norm
        # (DeepSpeed's own optimizer wrappers do, and derive from no torch class)
        self.own_grad_norm = isinstance(self.engine.optimizer, torch.optim.Optimizer)
        self.grad_norm: torch.Tensor | None = None
        self.reader = ShardReader(
            self.data_dir, "train", seed=t.seed, rank=self.dp_rank, world_size=self.dp_world
        )
        self.objective = Objective(
            family=spec.model.family,
            special_ids=self.manifest["special_ids"],
            document_masking=t.document_masking,
            mlm_probability=t.mlm_probability,
            max_source_len=self.manifest.get("max_source_len"),
            vocab_size=self.manifest["vocab_size"],
            sp_rank=self.rank % self.sp_size,
            sp_size=self.sp_size,
        )
        seq = self.manifest["seq_len"]
        self.tokens_per_step = t.global_batch_size * seq
        self.flops_per_token = train_flops_per_token(spec.attention, spec.model.architecture(), seq)
        self.peak = DevicePeak(self.device, t.precision, t.peak_flops) if self.rank == 0 else None

    def restore(self, folder: Path) -> int:
        meta = read_meta(folder)
        self.engine.load_checkpoint(str(folder), tag=DS_TAG)
        state = read_rank_state(folder, self.rank if meta["world_size"] == self.world else 0)
        self.reader.load_state_dict(state["reader"])
        if meta["world_size"] == self.world:
            set_rng_state(state["rng"])
        return int(meta["step"])

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        import ray.train

        self.build()
        step = 0
        own = latest_complete(Path(self.cfg.run_dir)) if Path(self.cfg.run_dir).exists() else None
        checkpoint = ray.train.get_checkpoint()
        if own is not None:
            # after a failure: this run's newest complete checkpoint. Ray Train's own pick
            # can be older, when a worker died before the controller registered a report.
            step = self.restore(own)
            self.event("resume", step=step, checkpoint=str(own), cause="failure")
        elif checkpoint is not None:  # storage this machine cannot list (s3://, gs://)
            with checkpoint.as_directory() as local:
                step = self.restore(Path(local))
            self.event("resume", step=step, checkpoint=checkpoint.path, cause="failure")
        elif self.cfg.resume_from:
            step = self.restore(Path(self.cfg.resume_from))
            self.event("resume", step=step, checkpoint=self.cfg.resume_from, cause="requested")
        else:
            self.event("start", step=0)
        malloc = {k: os.environ[k] for k in CPU_WORKER_ENV if k in os.environ}
        self.event("placement", every_rank=True, rank=self.rank, node=_node_id(), malloc=malloc)
        if self.rank == 0 and self.cfg.mlflow_run_id:
            from pipeline.tracking.buffer import MetricBuffer

            self.metrics = MetricBuffer(
                self.cfg.tracking_uri or "",
                self.cfg.mlflow_run_id,
                capacity=self.spec.tracking.buffer_size,
            )
        t = self.spec.training
        if step == 0:  # the maps before training: the MLflow image cards open at step 0
            self.heatmaps(0)
        losses: list[torch.Tensor] = []
        window_start, window_steps = time.perf_counter(), 0
        try:
            while step < t.steps:
                losses.append(self.train_step(step))
                step += 1
                window_steps += 1
                self.fault("kill", step)
                last = step == t.steps
                logged: dict[str, float] = {}
                if step % t.log_interval == 0 or last:
                    seconds = (time.perf_counter() - window_start) / window_steps
                    logged = self.train_metrics(losses, seconds)
                    losses, window_start, window_steps = [], time.perf_counter(), 0
                if step % t.eval_interval == 0 or last:
                    logged.update(self.evaluate())
                    self.heatmaps(step)
                if logged:
                    self.log(logged, step)
                if step % t.checkpoint_interval == 0 or last:
                    self.save(step, logged)
        finally:
            if self.metrics is not None:
                stats = self.metrics.close(timeout=60.0)
                self.event("tracking", **stats)

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step over `accum` micro batches; returns the mean loss, a 0-d tensor
        on the worker's device: reading it is a host sync, left to the log step."""
        t = self.spec.training
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for micro in range(self.accum):
            batch = self.reader.next_batch(t.micro_batch_size)
            # seeded by the data-parallel rank: the ranks sharing a sample corrupt it alike
            gen = torch.Generator().manual_seed(
                ((t.seed * 1_000_003 + step) * 1_009 + micro) * 4_099 + self.dp_rank
            )
            loss = self.objective.loss_parts(self.engine, batch, gen).mean(self.sp_size)
            if self.spans:
                coef = self.spec.attention.adaptive_span.loss_coefficient  # type: ignore[union-attr]
                loss = loss + coef * sum(m.penalty() for m in self.spans)
            self.engine.backward(loss)
            if micro == self.accum - 1 and self.own_grad_norm:
                # the gradients are whole and reduced here, before the step clips and clears
                # them: DeepSpeed keeps a norm only where its own optimizer wraps the step
                self.grad_norm = torch.nn.utils.get_total_norm(
                    [p.grad for p in self.engine.module.parameters() if p.grad is not None]
                )
            self.engine.step()
            total += loss.detach().float()
        for m in self.spans:
            m.clamp_()
        return total / self.accum

    # ------------------------------------------------------------------ metrics

    def all_reduce_sum(self, values: list[torch.Tensor | float]) -> list[float]:
        """Sums of plain numbers (or 0-d tensors) over all ranks, in one collective. The
        buffer lives on the worker's device: NCCL, the GPU backend, takes device tensors
        only ("No backend type associated with device type cpu")."""
        buffer = torch.stack(
            [torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in values]
        )
        dist.all_reduce(buffer)
        return buffer.tolist()

    def train_metrics(
        self, losses: list[torch.Tensor | float], step_seconds: float
    ) -> dict[str, float]:
        (loss_sum,) = self.all_reduce_sum([sum(losses) / len(losses)])
        tokens_per_s = self.tokens_per_step / step_seconds
        out = {
            "train/loss": loss_sum / self.world,
            "train/lr": float(self.scheduler.get_last_lr()[0]),
            "train/step_time_s": step_seconds,
            "train/tokens_per_s": tokens_per_s,
        }
        norm = self.grad_norm if self.own_grad_norm else self.engine.get_global_grad_norm()
        if norm is not None:
            out["train/grad_norm"] = float(norm)
        if self.peak is not None:  # rank 0
            out["train/mfu"] = self.peak.utilisation(
                self.flops_per_token * tokens_per_s / self.world
            )
        if self.device.type == "cuda":
            out["train/memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            out["train/memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        for i, m in enumerate(self.spans):
            out[f"attention/span_mean_layer{i}"] = float(m.spans().mean())
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss and perplexity over the first eval_batches batches of the
        validation split (the same samples at every evaluation), summed over ranks."""
        t = self.spec.training
        reader = ShardReader(
            self.data_dir,
            "val",
            seed=t.seed,
            rank=self.dp_rank,
            world_size=self.dp_world,
            shuffle=False,
            verify=False,
        )
        per_step = t.micro_batch_size * self.dp_world
        # a group of P ranks sharing each sample evaluates P times the batches of one rank:
        # the same samples, and the same work per rank, whatever P is
        batches = min(t.eval_batches * self.sp_size, max(1, len(reader) // per_step))
        was_training = self.engine.module.training
        self.engine.module.eval()
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        count_total = 0
        for i in range(batches):
            batch = reader.next_batch(t.micro_batch_size)
            gen = torch.Generator().manual_seed(t.seed * 7_919 + i * 31 + self.dp_rank)
            loss_sum, count = self.objective.loss(self.engine, batch, gen)
            loss_total += loss_sum.double()
            count_total += count
        self.engine.module.train(was_training)
        # sequence parallel, each rank counts its slice's targets: the sums are the group's
        loss_sum, count_sum = self.all_reduce_sum([loss_total, count_total])
        loss = loss_sum / max(count_sum, 1)
        return {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0))}

    @torch.no_grad()
    def heatmaps(self, step: int) -> None:
        """Attention maps of the chosen layers and heads on a fixed validation snippet, as
        PNGs under <run>/heatmaps/step-N/ (the driver logs them to MLflow as images, so a
        slow tracking server never holds training up). Every rank runs the forward pass,
        which ZeRO-3 needs; rank 0 draws. The snippet is short: drawn without sequence
        parallelism, every head on every rank."""
        from models.heatmap import attention_heatmaps
        from models.maps import attention_layers
        from models.parallel import set_sequence_parallel

        track, family = self.spec.tracking, self.spec.model.family
        if track.heatmap_tokens == 0:
            return
        reader = ShardReader(self.data_dir, "val", shuffle=False, verify=False)
        row = reader.sample(0)[0]
        n = track.heatmap_tokens
        if family == "encoder_decoder":
            n = min(n, self.manifest["max_source_len"])
        ids = torch.from_numpy(row[:n].astype("int64"))[None].to(self.device)
        stack = "decoder" if family == "decoder" else "encoder"
        if family == "encoder_decoder":
            bos = self.manifest["special_ids"]["bos"]
            inputs = {"src_ids": ids, "tgt_ids": torch.full_like(ids[:, :1], bos)}
        else:
            inputs = {"input_ids": ids}
        model = self.engine.module
        n_layers = len(attention_layers(model, stack))
        layers = sorted({i % n_layers for i in track.heatmap_layers})
        heads = [h for h in track.heatmap_heads if h < self.spec.model.n_heads]
        out = Path(self.cfg.run_dir) / "heatmaps" / f"step-{step:08d}"
        set_sequence_parallel(model, None)
        try:
            if self.rank == 0:
                out.mkdir(parents=True, exist_ok=True)
                labels = token_labels(self.data_dir, row[:n].tolist())
                attention_heatmaps(model, inputs, labels, out, layers, heads, stack)
            else:  # the same forward pass, for the collectives of a partitioned model
                from models.maps import attention_maps

                attention_maps(model, inputs, stack, layers, heads)
        finally:
            set_sequence_parallel(model, self.sp)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.metrics is not None:
            self.metrics.log_metrics(metrics, step=step)
        if self.rank == 0:
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if "/" in k)
            print(f"step {step}/{self.spec.training.steps} {shown}", flush=True)  # to the driver

    # ------------------------------------------------------------------ checkpoints

    def save(self, step: int, metrics: dict[str, float]) -> None:
        """Every rank writes its part into a fresh local folder; Ray Train merges the parts
        into one checkpoint folder in the run's storage and registers it once every rank
        has reported. Each rank's `.done` marker comes last."""
        import ray.train

        folder = Path(tempfile.mkdtemp(prefix="attnpipe-checkpoint-"))
        try:
            self.write_checkpoint(folder, step)
            ray.train.report(
                {"step": step, **metrics},
                checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                checkpoint_dir_name=checkpoint_name(step),
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def write_checkpoint(self, folder: Path, step: int) -> None:
        """This rank's part of the checkpoint at `step`: DeepSpeed's files, meta.json (rank
        0) and the rank's reader and RNG state, its `.done` marker last."""
        self.engine.save_checkpoint(str(folder), tag=DS_TAG)
        self.fault("checkpoint", step)
        state = {"reader": self.reader.state_dict(), "rng": rng_state(), "step": step}
        if self.rank == 0:
            write_meta(
                folder,
                {
                    "step": step,
                    "world_size": self.world,
                    "sequence_parallel": self.sp_size,
                    # the stage DeepSpeed ran (bf16 runs stage 0 as 1: deepspeed_config)
                    "zero_stage": self.engine.zero_optimization_stage(),
                    "precision": self.spec.training.precision,
                    "param_groups": self.param_groups,
                    "spec": self.cfg.spec,
                    "data_fingerprint": self.manifest["fingerprint"],
                    "data_dir": self.cfg.data_dir,
                    "time": time.time(),
                },
            )
        write_rank_state(folder, self.rank, state)

    # ------------------------------------------------------------------ events, faults

    def event(self, kind: str, every_rank: bool = False, **fields: Any) -> None:
        """One line in the run's events.jsonl (rank 0 unless every_rank): starts, resumes,
        placement, tracking stats."""
        if self.rank != 0 and not every_rank:
            return
        self.events.parent.mkdir(parents=True, exist_ok=True)
        line = {"event": kind, "time": time.time(), "pid": os.getpid(), **fields}
        with self.events.open("a") as f:
            f.write(json.dumps(line) + "\n")

    def fault(self, where: str, step: int) -> None:
        """Fault injection for the fault-tolerance tests: once per run (a marker file
        remembers), the named rank kills its own process at the named point."""
        spec = self.cfg.faults.get(where)
        if not spec or spec["rank"] != self.rank or spec["step"] != step:
            return
        marker = Path(self.cfg.faults["marker_dir"]) / f"{where}-{step}"
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def token_labels(data_dir: Path, ids: list[int]) -> list[str]:
    """Readable labels for token ids: the tokenizer's pieces, byte-level marks undone."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    return [tok.decode([i]).replace("\n", "\\n") or f"<{i}>" for i in ids]


def _exported_weights(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from models.pretrained import WEIGHTS

    return load_file(str(Path(folder) / WEIGHTS))
