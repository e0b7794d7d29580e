"""Whole training steps at long length, side by side in one run: dense SDPA against sliding
window, Longformer and BigBird on the block-sparse backend, and sequence parallelism.

The model: a decoder with d_model 256, 4 layers, 4 heads of 64, vocabulary 8,192, RoPE,
fp32, batch 1, built by attnpipe's models API and trained by a DeepSpeed engine (ZeRO 0,
torch AdamW) from the config attnpipe's workers get (pipeline.train.deepspeed_config): a
step is forward, backward and optimizer step. The table, identity and sp rows run the LM
head's fused loss in chunks of 8,192 tokens (`training.loss_chunk_tokens`, --loss-chunk), as
a long-context job would: at 64K tokens the whole logits are 2 GiB tensors that glibc maps
and faults in anew every step. Every configuration runs in its own process (one per rank
with sequence parallelism, gloo), one after another, so each has the machine and its own
peak RSS, under the malloc settings of attnpipe's CPU workers (CPU_WORKER_ENV) except where
a row says worker_malloc false. The tokens are Zipf-distributed (a fixed seed), so a model
that trains shows it by a falling loss.

Records (benchmarks/results/long_context.json):
- per pattern and length: step_ms_min/median over the timed steps (after one untimed
  warm-up step that builds the per-length plans; 6 timed steps at 4K, 3 at 16K, 2 above),
  ms_per_token, tokens_per_s, speedup_vs_dense, peak_rss_bytes (ru_maxrss of the process,
  the largest rank's), planned_bytes (pipeline.plan.predicted_peak_bytes of the same job,
  under the same malloc settings) and their ratio, and attention_share: 1 - (the step with
  every attention call replaced by an identity of the same shapes) / (the step), the
  identity step measured once per length;
- the chunked loss: BigBird at 32K with a 32K vocabulary, whole logits against
  loss_chunk_tokens 4,096, peak RSS of both against the logits' size;
- sequence parallelism's cost: BigBird at the same length with P=1 (2 threads) and P=2
  (two processes of 1 thread), and the all-to-all's share of the P=2 step;
- the longest sequence trained: P=2 BigBird for 10 steps at each length asked for, with
  activation checkpointing, tiled MLP and the chunked loss, under glibc's malloc defaults
  (main() says why); the longest whose loss fell, its tokens/s, and what stopped the next;
- BigBird's ms per token from the shortest to the longest length once more, in rounds that
  alternate the two (--growth-rounds): the ratio of each round, min and median, since one
  table row is the min of 2 steps on a machine whose noise moves a step by 10-20%.
Every record says when it was measured (`measured`); a record kept from an earlier run of
the script (--sections) says "an earlier run".

Dense at 64K takes minutes a step on a 2-core CPU: it runs one timed step after the warm-up.

    python benchmarks/long_context.py --out benchmarks/results/long_context.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.runtime import free_port
from pipeline.train.ops import CPU_WORKER_ENV, init_loopback_group

ROOT = Path(__file__).resolve().parent.parent
CORES = 2

PATTERNS: dict[str, dict[str, Any]] = {
    "dense": {"pattern": "dense", "backend": "sdpa", "params": {}},
    "window": {"pattern": "sliding_window", "backend": "blocksparse", "params": {"window": 512}},
    "longformer": {
        "pattern": "longformer",
        "backend": "blocksparse",
        "params": {"window": 512, "global_tokens": [0]},
    },
    "bigbird": {
        "pattern": "bigbird",
        "backend": "blocksparse",
        "params": {"block": 64, "window": 3, "global_blocks": [0], "random": 3},
    },
}


def overrides(c: dict[str, Any]) -> list[str]:
    """The job spec of one configuration, as `attnpipe` overrides."""
    attn = PATTERNS[c["pattern"]]
    out = [
        "model.family=decoder",
        "model.d_model=256",
        "model.n_layers=4",
        "model.n_heads=4",
        f"model.vocab_size={c['vocab']}",
        "model.positional=rope",
        "model.dropout=0.0",
        f"model.max_seq_len={c['seq_len']}",
        f"data.seq_len={c['seq_len']}",
        f"data.tokenizer.vocab_size={c['vocab']}",
        f"attention.pattern={attn['pattern']}",
        f"attention.backend={attn['backend']}",
        "attention.block_size=64",
        f"attention.params={json.dumps(attn['params'])}",
        "training.precision=fp32",
        "training.document_masking=false",  # one document per row: no mask to build
        "training.micro_batch_size=1",
        "training.global_batch_size=1",
        "training.optimizer.lr=1e-3",
        "training.lr_schedule.name=constant",
        "training.lr_schedule.warmup_steps=0",
        f"training.activation_checkpointing={str(c.get('checkpointing', False)).lower()}",
        f"resources.num_workers={c['sp']}",
        f"resources.sequence_parallel={c['sp']}",
        "resources.gpus_per_worker=0",
        f"resources.cpus_per_worker={CORES // c['sp']}",
        "deepspeed.zero_stage=0",
    ]
    if c.get("loss_chunk"):
        out.append(f"training.loss_chunk_tokens={c['loss_chunk']}")
    if c.get("mlp_chunk"):
        out.append(f"training.mlp_chunk_tokens={c['mlp_chunk']}")
    return out


def planned_bytes(c: dict[str, Any]) -> int:
    """The planner's peak for configuration `c`, under the malloc settings it runs with."""
    from pipeline.config import load_spec
    from pipeline.plan import predicted_peak_bytes

    spec = load_spec(None, overrides(c))
    return int(predicted_peak_bytes(spec, worker_malloc=c.get("worker_malloc", True)))


def tokens(seq_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """(1, seq_len + 1) Zipf-distributed token ids: a unigram distribution to learn."""
    rng = np.random.default_rng(seed)
    ids = (rng.zipf(1.2, size=seq_len + 1) - 1) % vocab
    return torch.from_numpy(ids.astype(np.int64))[None]


# ------------------------------------------------------------------ one configuration


def _rank(rank: int, c: dict[str, Any], port: int, out: str) -> None:
    import deepspeed

    import models.parallel as parallel
    from models.attention.backends import BACKENDS
    from models.parallel import sequence_groups, set_sequence_parallel
    from models.transformer import (
        build_model,
        set_activation_checkpointing,
        set_loss_chunking,
        set_mlp_chunking,
    )
    from pipeline.config import load_spec
    from pipeline.train.deepspeed_config import deepspeed_config
    from pipeline.train.objectives import LossParts

    p = c["sp"]
    init_loopback_group(rank, p, port)
    torch.set_num_threads(CORES // p)
    spec = load_spec(None, overrides(c))
    t = spec.training
    torch.manual_seed(0)
    model = build_model(spec.model.architecture(), spec.attention)
    set_activation_checkpointing(model, t.activation_checkpointing)
    set_loss_chunking(model, t.loss_chunk_tokens)
    set_mlp_chunking(model, t.mlp_chunk_tokens)
    sp = sequence_groups(p)
    set_sequence_parallel(model, sp)
    if c.get("identity"):  # attention's cost out of the step: an identity of its shapes
        for cls in BACKENDS.values():  # each backend has its own attend
            cls.attend = lambda self, q, k, v, prepared, dropout_p: q * 1.0  # type: ignore
    a2a = [0.0]
    if sp is not None:  # time the all-to-alls
        inner = parallel._all_to_all

        def timed(*args: Any) -> torch.Tensor:
            start = time.perf_counter()
            try:
                return inner(*args)
            finally:
                a2a[0] += time.perf_counter() - start

        parallel._all_to_all = timed
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=deepspeed_config(spec, p),
        dist_init_required=False,
    )
    if p == 1:
        engine.enable_backward_allreduce = False  # as the worker does on one rank
    ids = tokens(c["seq_len"], c["vocab"])
    inputs, labels = ids[:, :-1], ids[:, 1:]
    times, losses, a2a_times = [], [], []
    for i in range(c["warmup"] + c["steps"]):
        a2a[0] = 0.0
        start = time.perf_counter()
        loss_sum = engine(inputs, labels=labels)
        parts = LossParts(loss_sum, labels.numel() // p, labels.numel())
        engine.backward(parts.mean(p))  # the group's token mean, as the workers take it
        engine.step()
        total = loss_sum.detach().clone()
        if sp is not None:
            dist.all_reduce(total, group=sp.group)
        elapsed = time.perf_counter() - start
        losses.append(float(total) / labels.numel())
        if i >= c["warmup"]:
            times.append(elapsed)
            a2a_times.append(a2a[0])
        if rank == 0:
            print(f"  {c['name']} step {i}: {elapsed:.2f} s loss {losses[-1]:.4f}", flush=True)
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0])
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    if rank == 0:
        record = {"times": times, "losses": losses, "a2a": a2a_times, "peak_rss_bytes": int(rss)}
        Path(out).write_text(json.dumps(record))
    dist.destroy_process_group()


def one(c: dict[str, Any], out: str) -> None:
    port = free_port()
    if c["sp"] == 1:
        _rank(0, c, port, out)
    else:
        mp.spawn(_rank, args=(c, port, out), nprocs=c["sp"], join=True)
    # the record is written: leave without the interpreter's teardown, where a thread of
    # the communication backend has been seen to abort the process after the work was done
    sys.stdout.flush()
    os._exit(0)


def measure(c: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run configuration `c` in a fresh process; its record, or why it has none."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        # the training workers' malloc settings keep freed memory in the heap (speed); at
        # the memory limit they cost what the heap's fragments hold, so "longest" goes without
        malloc = CPU_WORKER_ENV if c.get("worker_malloc", True) else {}
        env = {**os.environ, **malloc, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, __file__, "--one", json.dumps(c), "--record", str(out)]
        start = time.perf_counter()
        try:
            run = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"error": f"no result within {timeout:.0f} s"}
        wall = time.perf_counter() - start
        sys.stdout.write(run.stdout)
        if run.returncode != 0 or not out.exists():
            tail = (run.stderr.strip().splitlines() or ["?"])[-1]
            killed = run.returncode in (-9, 137)
            return {"error": "killed (out of memory?)" if killed else tail, "rc": run.returncode}
        record = json.loads(out.read_text())
    record["process_wall_s"] = wall
    return record


def summarise(c: dict[str, Any], r: dict[str, Any]) -> dict[str, Any]:
    row = {k: c[k] for k in ("name", "pattern", "seq_len", "sp", "vocab")}
    row.update(sequence_parallel=c["sp"], steps_timed=len(r.get("times", [])))
    for key in ("loss_chunk", "mlp_chunk", "checkpointing"):
        if c.get(key):
            row[key] = c[key]
    if "round" in c:
        row["round"] = c["round"]
    row["worker_malloc"] = c.get("worker_malloc", True)
    row["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if "error" in r:
        return {**row, "error": r["error"]}
    times = r["times"]
    step_min = min(times)
    row.update(
        step_ms_min=1000 * step_min,
        step_ms_median=1000 * statistics.median(times),
        ms_per_token=1000 * step_min / c["seq_len"],
        tokens_per_s=c["seq_len"] / step_min,
        peak_rss_bytes=r["peak_rss_bytes"],
        losses=r["losses"],
    )
    if c["sp"] > 1:
        row["all_to_all_share"] = min(a / s for a, s in zip(r["a2a"], times, strict=True))
    return plan(row)


def plan(row: dict[str, Any]) -> dict[str, Any]:
    """The planner's prediction for a measured row (not for the identity step, whose
    attention stores nothing)."""
    if row["name"] == "identity" or "peak_rss_bytes" not in row:
        return row
    planned = planned_bytes(row)
    row.update(planned_bytes=planned, planned_over_measured=planned / row["peak_rss_bytes"])
    return row


SECTIONS = {"table": tuple(PATTERNS), "identity": ("identity",), "loss": ("loss-chunk",)}
SECTIONS.update(sp=("sp-cost",), longest=("longest",), growth=("growth",))


def section_of(row: dict[str, Any]) -> str:
    return next(k for k, names in SECTIONS.items() if row["name"] in names)


def rerun(row: dict[str, Any], args: argparse.Namespace) -> bool:
    """Whether this run replaces `row` (the table and identity sections: at its lengths)."""
    section = section_of(row)
    if section not in args.sections:
        return False
    if section == "longest":
        return row["seq_len"] in args.longest
    return section not in ("table", "identity") or row["seq_len"] in args.lengths


def config(name: str, pattern: str, seq_len: int, **kw: Any) -> dict[str, Any]:
    c = {"name": name, "pattern": pattern, "seq_len": seq_len, "sp": 1, "vocab": 8192}
    # short steps are timed more often: the machine's noise is a larger part of them
    c.update(warmup=1, steps=6 if seq_len <= 4096 else 3 if seq_len <= 16384 else 2)
    c.update(kw)
    return c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/long_context.json")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS))
    parser.add_argument("--longest", type=int, nargs="*", default=[131072, 262144])
    parser.add_argument("--longest-steps", type=int, default=10)
    parser.add_argument("--sp-length", type=int, default=32768)
    parser.add_argument(
        "--growth-rounds",
        type=int,
        default=3,
        help="rounds of BigBird at the shortest and longest --lengths, one after the other",
    )
    parser.add_argument("--loss-length", type=int, default=32768)
    parser.add_argument(
        "--loss-chunk",
        type=int,
        default=8192,
        help="training.loss_chunk_tokens of the table, identity and sp rows (0: whole logits)",
    )
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="run these parts only, keeping the other parts' records already in --out",
    )
    parser.add_argument(
        "--replan",
        action="store_true",
        help="only recompute planned_bytes of the records in --out with today's planner",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(json.loads(args.one), args.record)
        return

    if args.replan:
        doc = json.loads(args.out.read_text())
        rows = [plan(row) for row in doc["records"]]
        write(
            args.out,
            rows,
            time.time() - 60 * doc["minutes"],
            final=doc["complete"],
            loss_chunk=doc.get("loss_chunk_tokens", 0),
        )
        return
    started = time.time()
    rows: list[dict[str, Any]] = []
    if set(args.sections) != set(SECTIONS) and args.out.exists():
        kept = json.loads(args.out.read_text())["records"]
        rows = [{"measured": "an earlier run", **r} for r in kept if not rerun(r, args)]

    def run(c: dict[str, Any]) -> dict[str, Any]:
        print(f"{c['name']} at {c['seq_len']:,} tokens (P={c['sp']})", flush=True)
        row = summarise(c, measure(c, args.timeout))
        rows.append(row)
        shown = {k: row.get(k) for k in ("step_ms_min", "peak_rss_bytes", "error") if k in row}
        print(f"  -> {shown}", flush=True)
        write(args.out, rows, started, final=False, loss_chunk=args.loss_chunk)
        return row

    chunk = {"loss_chunk": args.loss_chunk} if args.loss_chunk else {}
    # 1. the patterns at each length, and the identity step for attention's share
    for seq_len in args.lengths:
        if "identity" in args.sections:
            run(config("identity", "dense", seq_len, identity=True, **chunk))
        for pattern in args.patterns if "table" in args.sections else []:
            # dense at 64K: one timed step after the warm-up (whose peak, the heap not yet
            # grown by a second step, the planner's steady-state model over-predicts 1.35x)
            slow = pattern == "dense" and seq_len >= 65536
            once = {"steps": 1} if slow else {}
            run(config(pattern, pattern, seq_len, **once, **chunk))
    # 2. the chunked loss: whole logits against chunks, at a 32K vocabulary
    for whole in (True, False) if "loss" in args.sections else ():
        c = config("loss-chunk", "bigbird", args.loss_length, vocab=32768)
        run(c if whole else {**c, "loss_chunk": 4096})
    # 3. sequence parallelism's cost at the same length and cores
    for p in (1, 2) if "sp" in args.sections else ():
        run(config("sp-cost", "bigbird", args.sp_length, sp=p, **chunk))
    # 4. the longest sequence trained: P=2, every memory saving on, glibc's malloc defaults:
    # the workers' CPU_WORKER_ENV keeps freed blocks in the heap, which at 131K held 8.5 GB a
    # rank against 2.6 GB with the defaults (measured), so that 262K would not fit two ranks
    for seq_len in args.longest if "longest" in args.sections else []:
        kw = dict(sp=2, warmup=0, steps=args.longest_steps, checkpointing=True, worker_malloc=False)
        row = run(config("longest", "bigbird", seq_len, loss_chunk=8192, mlp_chunk=8192, **kw))
        if "error" in row:
            break
    # 5. BigBird's cost per token from the shortest to the longest length once more, in
    # rounds that alternate the two: one table row is the min of 2 steps of a noisy machine
    ends = (min(args.lengths), max(args.lengths))
    for i in range(args.growth_rounds) if "growth" in args.sections else ():
        for seq_len in ends:
            run(config("growth", "bigbird", seq_len, round=i, **chunk))
    write(args.out, rows, started, final=True, loss_chunk=args.loss_chunk)


def write(
    path: Path, rows: list[dict[str, Any]], started: float, final: bool, loss_chunk: int = 0
) -> None:
    def find(name: str, pattern: str, seq_len: int, **kw: Any) -> dict[str, Any] | None:
        for r in rows:
            if (r["name"], r["pattern"], r["seq_len"]) == (name, pattern, seq_len) and all(
                r.get(k) == v for k, v in kw.items()
            ):
                return r if "error" not in r else None
        return None

    table = [r for r in rows if r["name"] in PATTERNS]
    for r in table:
        dense = find("dense", "dense", r["seq_len"])
        rest = find("identity", "dense", r["seq_len"])
        if dense and "step_ms_min" in r:
            r["speedup_vs_dense"] = dense["step_ms_min"] / r["step_ms_min"]
        if rest and "step_ms_min" in r:  # the share of the step attention takes
            r["attention_share"] = max(0.0, 1 - rest["step_ms_min"] / r["step_ms_min"])
    lengths = sorted({r["seq_len"] for r in table})
    summary: dict[str, Any] = {}
    bigbird = {n: find("bigbird", "bigbird", n) for n in lengths}
    for n in (16384, 32768, 65536):
        if bigbird.get(n) and "speedup_vs_dense" in bigbird[n]:  # type: ignore[operator]
            summary[f"bigbird_speedup_at_{n}"] = bigbird[n]["speedup_vs_dense"]  # type: ignore[index]
    ends = [n for n in lengths if bigbird.get(n)]
    if len(ends) >= 2:
        lo, hi = bigbird[ends[0]], bigbird[ends[-1]]
        summary["bigbird_ms_per_token_growth"] = {
            "from": ends[0],
            "to": ends[-1],
            "ratio": hi["ms_per_token"] / lo["ms_per_token"],  # type: ignore[index]
        }
    rounds: dict[int, dict[int, float]] = {}
    for r in rows:
        if r["name"] == "growth" and "error" not in r:
            rounds.setdefault(r["round"], {})[r["seq_len"]] = r["ms_per_token"]
    ratios = [x[max(x)] / x[min(x)] for x in rounds.values() if len(x) == 2]
    if ratios:
        summary["bigbird_ms_per_token_growth_rounds"] = {
            "ratios": ratios,
            "min": min(ratios),
            "median": statistics.median(ratios),
        }
    if 32768 in lengths and 65536 in lengths:
        growth = {}
        for pattern in ("window", "longformer", "bigbird"):
            a, b = find(pattern, pattern, 32768), find(pattern, pattern, 65536)
            if a and b:
                growth[pattern] = b["peak_rss_bytes"] / a["peak_rss_bytes"]
        summary["peak_rss_growth_32k_to_64k"] = growth
    whole = next((r for r in rows if r["name"] == "loss-chunk" and "loss_chunk" not in r), None)
    chunked = next((r for r in rows if r["name"] == "loss-chunk" and "loss_chunk" in r), None)
    if whole and chunked and "error" not in whole and "error" not in chunked:
        logits = whole["seq_len"] * whole["vocab"] * 4
        summary["chunked_loss"] = {
            "seq_len": whole["seq_len"],
            "vocab": whole["vocab"],
            "logits_bytes": logits,
            "peak_whole": whole["peak_rss_bytes"],
            "peak_chunked": chunked["peak_rss_bytes"],
            "saved_over_logits": (whole["peak_rss_bytes"] - chunked["peak_rss_bytes"]) / logits,
        }
    sp = {r["sp"]: r for r in rows if r["name"] == "sp-cost" and "error" not in r}
    if 1 in sp and 2 in sp:
        summary["sequence_parallel_cost"] = {
            "seq_len": sp[1]["seq_len"],
            "p2_over_p1_step": sp[2]["step_ms_min"] / sp[1]["step_ms_min"],
            "all_to_all_share": sp[2].get("all_to_all_share"),
        }
    trained = [
        r
        for r in rows
        if r["name"] == "longest" and "error" not in r and r["losses"][-1] < r["losses"][0]
    ]
    if trained:
        best = max(trained, key=lambda r: r["seq_len"])
        summary["longest_trained_seq_len"] = best["seq_len"]
        summary["longest_trained_tokens_per_s"] = best["tokens_per_s"]
    failed = [r for r in rows if r["name"] == "longest" and "error" in r]
    if failed:
        summary["longest_limited_by"] = f"{failed[0]['seq_len']:,} tokens: {failed[0]['error']}"
    # the planner's prediction of every measured row, under the malloc settings it ran with
    checked = [r["planned_over_measured"] for r in rows if "planned_over_measured" in r]
    if checked:
        summary["planned_over_measured"] = {"min": min(checked), "max": max(checked)}
        summary["plan_within_25_percent"] = all(0.75 <= x <= 1.25 for x in checked)
    doc = {
        "benchmark": "long_context",
        "complete": final,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
        },
        "model": "decoder d_model 256, 4 layers, 4 heads of 64, vocab 8192, RoPE, fp32, batch 1",
        "loss_chunk_tokens": loss_chunk,
        "attention_share_method": "identity: 1 - step with attention replaced by q / step",
        "minutes": (time.time() - started) / 60,
        "summary": summary,
        "records": rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
