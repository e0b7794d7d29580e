"""Sequence parallelism (models/parallel.py) computes what one process computes.

Two gloo ranks split every sequence in two. For every pattern and backend that trains (and
flex's forward), with document masking, padding, grouped-query attention (including fewer
key/value heads than ranks), every positional encoding and the encoder: the logits of each
rank's slice, the loss summed over the ranks and every parameter's gradient summed over
them equal the whole sequence's in one process (fp64). Through the DeepSpeed engine (the
worker's own train_step, ZeRO 1 and 2), with P=2 and P=2 x data-parallel 2: the step's loss,
every parameter's gradient and the weights after the step equal one process's within 1e-6,
which a gradient scaled by P would fail. A P=2 run resumed from a checkpoint ends bitwise
equal to the uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.data.shards import write_random_documents
from pipeline.runtime import free_port

ROOT = Path(__file__).resolve().parent.parent
S = 64  # tokens per sequence: 4 blocks of 16, 32 per rank

# (name, family, positional, kv heads, pattern, backend, params, documents/padding, span)
CASES: list[tuple[str, str, str, int, str, str, dict[str, Any], str, bool]] = [
    ("dense-sdpa-rope", "decoder", "rope", 4, "dense", "sdpa", {}, "docs", False),
    ("dense-sdpa-alibi-mqa", "decoder", "alibi", 1, "dense", "sdpa", {}, "none", False),
    ("dense-reference-gqa", "decoder", "learned", 2, "dense", "reference", {}, "pad", False),
    ("dense-blocksparse", "decoder", "sinusoidal", 4, "dense", "blocksparse", {}, "docs", False),
    ("window-prefix", "decoder", "rope", 4, "sliding_window", "blocksparse",
     {"window": 24, "prefix": 8}, "none", False),
    ("dilated", "decoder", "rope", 2, "dilated", "blocksparse",
     {"window": 8, "dilation": 2}, "docs", False),
    ("strided", "decoder", "rope", 4, "strided", "blocksparse", {"stride": 16}, "none", False),
    ("fixed", "decoder", "rope", 4, "fixed", "blocksparse",
     {"stride": 16, "summary": 4}, "docs", False),
    ("longformer-mqa", "decoder", "rope", 1, "longformer", "blocksparse",
     {"window": 16, "global_tokens": [0, 40]}, "docs", False),
    ("bigbird-per-head-gqa", "decoder", "rope", 2, "bigbird", "blocksparse",
     {"block": 8, "window": 3, "random": 1, "per_head": True}, "docs", False),
    ("variable", "decoder", "rope", 4, "variable", "blocksparse",
     {"block": 16, "local_windows": [2]}, "none", False),
    ("adaptive-span", "decoder", "rope", 4, "dense", "sdpa", {}, "none", True),
    ("encoder-bigbird-per-head", "encoder", "learned", 4, "bigbird", "blocksparse",
     {"block": 8, "window": 3, "random": 1, "per_head": True}, "pad", False),
    ("encoder-sdpa", "encoder", "rope", 4, "dense", "sdpa", {}, "docs", False),
]  # fmt: skip
FLEX_CASES = [  # FlexAttention has no backward on CPU: the forward only
    ("flex-bigbird-per-head", "bigbird", {"block": 8, "random": 1, "per_head": True}, "docs"),
    ("flex-longformer", "longformer", {"window": 16, "global_tokens": [0, 40]}, "pad"),
]


def _model(family: str, positional: str, kv: int, pattern: str, backend: str, params, span):
    from models.config import AdaptiveSpanConfig, AttentionConfig, ModelConfig
    from models.transformer import build_model

    cfg = ModelConfig(
        family=family,
        vocab_size=50,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=kv,
        max_seq_len=S,
        positional=positional,
        dropout=0.0,
    )
    attention = AttentionConfig(
        pattern=pattern,
        backend=backend,
        block_size=16,
        params=params,
        adaptive_span=AdaptiveSpanConfig(max_span=24, ramp=4, init=0.6) if span else None,
    )
    torch.manual_seed(0)
    return build_model(cfg, attention).double()


def _inputs(masks: str, family: str) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 50, (2, S), generator=g)
    labels = torch.randint(4, 50, (2, S), generator=g)
    if family == "encoder":  # masked LM: a few targets
        labels = labels.masked_fill(torch.rand(2, S, generator=g) > 0.3, -100)
    docs = pad = None
    if masks == "docs":  # row 0: three documents, row 1: two (boundaries mid-slice too)
        docs = torch.tensor([[0] * 20 + [1] * 30 + [2] * 14, [5] * 40 + [6] * 24])
    if masks == "pad":
        pad = torch.ones(2, S, dtype=torch.bool)
        pad[1, 50:] = False
        labels[1, 50:] = -100
    return {"input_ids": ids, "key_padding_mask": pad, "document_ids": docs, "labels": labels}


def _model_cases(rank: int, port: int, out: str) -> None:
    from models.parallel import sequence_groups, set_sequence_parallel
    from pipeline.train.ops import init_loopback_group

    init_loopback_group(rank, 2, port)
    torch.set_num_threads(1)
    sp = sequence_groups(2)
    assert sp is not None and sp.rank == rank
    results = {}
    try:
        for name, family, positional, kv, pattern, backend, params, masks, span in CASES:
            model = _model(family, positional, kv, pattern, backend, params, span)
            inputs = _inputs(masks, family)
            logits = model(**{**inputs, "labels": None}).detach()
            loss = model(**inputs)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            model.zero_grad()
            set_sequence_parallel(model, sp)
            local_logits = model(**{**inputs, "labels": None}).detach()
            local_loss = model(**inputs)
            local_loss.backward()
            summed = local_loss.detach().clone()
            dist.all_reduce(summed, group=sp.group)
            diff = {"logits": float((local_logits - sp.local(logits)).abs().max())}
            diff["loss"] = float((summed - loss.detach()).abs())
            # relative to the largest gradient entry: a gradient that is zero in exact
            # arithmetic (the key bias: softmax ignores a constant per query) is only noise
            scale = max(float(g.abs().max()) for g in grads.values())
            for n, p in model.named_parameters():
                g = p.grad.clone()
                dist.all_reduce(g, group=sp.group)
                diff[n] = float((g - grads[n]).abs().max()) / scale
            results[name] = {"diff": diff, "loss": float(loss), "slice_loss": float(local_loss)}
        model = _model("decoder", "rope", 4, "dense", "sdpa", {}, False)
        set_sequence_parallel(model, sp)
        try:  # a KV cache would keep this rank's slice of the keys: refused, not wrong
            model(_inputs("none", "decoder")["input_ids"], cache=model.new_cache())
            results["decoding"] = "ran"
        except ValueError as exc:
            results["decoding"] = str(exc)
        for name, pattern, params, masks in FLEX_CASES:
            model = _model("decoder", "rope", 2, pattern, "flex", params, False)
            inputs = {**_inputs(masks, "decoder"), "labels": None}
            with torch.no_grad():
                logits = model(**inputs)
                set_sequence_parallel(model, sp)
                local_logits = model(**inputs)
            worst = float((local_logits - sp.local(logits)).abs().max())
            results[name] = {"diff": {"logits": worst}}
    finally:
        Path(out, f"model-{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def model_results(tmp_path_factory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("sp-model")
    mp.spawn(_model_cases, args=(free_port(), str(out)), nprocs=2, join=True)
    return [json.loads((out / f"model-{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("name", [c[0] for c in CASES] + [c[0] for c in FLEX_CASES])
def test_two_ranks_compute_what_one_process_computes(model_results, name):
    for rank in (0, 1):
        result = model_results[rank][name]
        worst = max(result["diff"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-9, (rank, worst)
    if "slice_loss" in model_results[0][name]:
        # each rank's loss is its own slice's, not the whole sequence's twice
        slices = [model_results[r][name]["slice_loss"] for r in (0, 1)]
        assert min(slices) > 0 and abs(sum(slices) - model_results[0][name]["loss"]) < 1e-9


@pytest.mark.parametrize("causal", [True, False])
def test_the_per_head_cases_give_each_rank_different_layouts(causal):
    """The check above holds only if the two ranks' heads differ: BigBird at 8-token blocks
    draws different random blocks for heads 0-1 (rank 0) and 2-3 (rank 1)."""
    from models.attention import make_pattern
    from models.attention.patterns import head_slice

    pattern = make_pattern(
        "bigbird", block=8, window=3, random=1, per_head=True, heads=4, causal=causal
    )
    full = pattern.dense_mask(S)
    assert not torch.equal(full[:2], full[2:])
    for heads in (slice(0, 2), slice(2, 4)):
        local = head_slice(pattern, heads)
        assert torch.equal(local.dense_mask(S), full[heads])
        assert torch.equal(local.block_layout(S, 16), pattern.block_layout(S, 16)[heads])
        if causal:
            one = head_slice(pattern, slice(heads.start + 1, heads.stop))  # one head: h=None
            assert torch.equal(one.dense_mask(S), full[heads.start + 1 : heads.stop])


# ---------------------------------------------------------------- through DeepSpeed


def _spec(out: str, world: int, p: int, stage: int) -> dict[str, Any]:
    from pipeline.config import load_spec

    return load_spec(
        ROOT / "jobs" / "decoder-tiny.yaml",
        [
            f"storage.work_dir={out}",
            "data.seq_len=64",
            "model.vocab_size=300",
            "model.n_kv_heads=1",  # fewer key/value heads than ranks: each gets a copy
            "data.tokenizer.vocab_size=300",
            "training.global_batch_size=4",
            f"training.micro_batch_size={4 // (world // p)}",
            "training.lr_schedule.warmup_steps=1",
            # AdamW's first step moves a weight by lr * g / (|g| + eps): with eps 1e-8 a
            # gradient of ~1e-8 (a cancellation) moves by a fraction of lr on a 1e-9 difference
            # of float sums taken in another order; eps 1e-5 bounds that by lr * 1e-4
            "training.optimizer.eps=1e-5",
            "training.loss_chunk_tokens=24",
            "attention.pattern=bigbird",
            "attention.backend=blocksparse",
            "attention.block_size=16",
            "attention.params.block=8",
            "attention.params.random=1",
            "attention.params.per_head=true",
            f"deepspeed.zero_stage={stage}",
            f"resources.num_workers={world}",
            f"resources.sequence_parallel={p}",
            "tracking.heatmap_tokens=0",
        ],
    ).model_dump(mode="json")


def _worker(out: str, data_dir: str, world: int, p: int, stage: int, rank: int, tag: str):
    from pipeline.train.worker import Worker, WorkerConfig

    run_dir = Path(out) / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = WorkerConfig(spec=_spec(out, world, p, stage), data_dir=data_dir, run_dir=str(run_dir))
    w = Worker(cfg, rank, world)
    w.build()
    return w


def _engine_rank(rank: int, world: int, p: int, port: int, data_dir: str, out: str) -> None:
    from deepspeed.utils import safe_get_full_grad

    from pipeline.train.ops import init_loopback_group

    init_loopback_group(rank, world, port)
    torch.set_num_threads(1)
    try:
        for stage in (1, 2):
            w = _worker(out, data_dir, world, p, stage, rank, f"run-{world}-{p}-{stage}")
            grads: dict[str, torch.Tensor] = {}
            step = w.engine.step

            def capture(step=step, w=w, grads=grads) -> None:
                for n, param in w.engine.module.named_parameters():
                    grads[n] = safe_get_full_grad(param).clone()
                step()

            w.engine.step = capture
            loss = w.train_step(0)
            (mean,) = w.all_reduce_sum([loss])
            weights = {n: q.detach().clone() for n, q in w.engine.module.named_parameters()}
            if rank == 0:
                record = {"loss": mean / world, "grads": grads, "weights": weights}
                torch.save(record, Path(out) / f"step-{world}-{p}-{stage}.pt")
            del w
            dist.barrier()
        if world == 2 and p == 2:  # resume: 4 steps, against 2 + a checkpoint + 2
            w = _worker(out, data_dir, world, p, 1, rank, "straight")
            for step in range(4):
                w.train_step(step)
                if step == 1:
                    w.write_checkpoint(Path(out) / "checkpoint", 2)
                    at_two = [q.detach().clone() for q in w.engine.module.parameters()]
            straight = [q.detach().clone() for q in w.engine.module.parameters()]
            del w
            dist.barrier()
            w = _worker(out, data_dir, world, p, 1, rank, "resumed")
            assert w.restore(Path(out) / "checkpoint") == 2
            for step in (2, 3):
                w.train_step(step)
            resumed = [q.detach().clone() for q in w.engine.module.parameters()]
            same = all(torch.equal(a, b) for a, b in zip(straight, resumed, strict=True))
            moved = any(not torch.equal(a, b) for a, b in zip(at_two, resumed, strict=True))
            Path(out, f"resume-{rank}.json").write_text(json.dumps({"same": same, "moved": moved}))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sp-engine")
    write_random_documents(out / "data", seq_len=64, vocab=300, samples=64)
    for world, p in ((1, 1), (2, 2), (4, 2)):
        args = (world, p, free_port(), str(out / "data"), str(out))
        mp.spawn(_engine_rank, args=args, nprocs=world, join=True)
    return out


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("world", [2, 4])
def test_a_sequence_parallel_step_equals_one_process(engine_runs, world, stage):
    one = torch.load(engine_runs / f"step-1-1-{stage}.pt")
    sp = torch.load(engine_runs / f"step-{world}-2-{stage}.pt")
    assert abs(sp["loss"] - one["loss"]) < 1e-6 * abs(one["loss"])
    scale = max(float(g.abs().max()) for g in one["grads"].values())
    for n, grad in one["grads"].items():
        assert float((sp["grads"][n] - grad).abs().max()) < 1e-6 * scale, n
    for n, weight in one["weights"].items():
        assert float((sp["weights"][n] - weight).abs().max()) < 1e-6, n


def test_a_sequence_parallel_run_resumes_bitwise(engine_runs):
    for rank in (0, 1):
        result = json.loads((engine_runs / f"resume-{rank}.json").read_text())
        assert result == {"same": True, "moved": True}, result


def test_decoding_under_sequence_parallelism_is_refused(model_results):
    for rank in (0, 1):
        assert model_results[rank]["decoding"] == (
            "sequence parallelism trains and evaluates: decoding and attention maps run without it"
        )
