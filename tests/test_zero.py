"""fp32 ZeRO keeps one copy of the weights (pipeline/train/zero.py): two gloo ranks train
with ZeRO-1, 2 and 3, with and without the shared master partitions; the weights and losses
must be bitwise the same, and the optimizer must update the model's own storage."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.data.shards import write_random_documents
from pipeline.runtime import free_port

ROOT = Path(__file__).resolve().parent.parent
STEPS = 3


def _rank(rank: int, world: int, port: int, data_dir: str, out_dir: str) -> None:
    import pipeline.train.worker as worker_module
    from pipeline.config import load_spec
    from pipeline.train.ops import init_loopback_group
    from pipeline.train.zero import partitions, share_master_weights

    init_loopback_group(rank, world, port)
    torch.set_num_threads(1)
    results = []
    try:
        for stage in (1, 2, 3):
            for share in (False, True):
                worker_module.share_master_weights = (
                    share_master_weights if share else (lambda optimizer: 0)
                )
                spec = load_spec(
                    ROOT / "jobs" / "decoder-tiny.yaml",
                    [
                        f"storage.work_dir={out_dir}",
                        "data.seq_len=32",
                        "model.vocab_size=300",
                        "data.tokenizer.vocab_size=300",
                        "training.global_batch_size=4",
                        "training.micro_batch_size=2",
                        "training.lr_schedule.warmup_steps=1",
                        f"deepspeed.zero_stage={stage}",
                        f"resources.num_workers={world}",
                        "tracking.heatmap_tokens=0",
                    ],
                ).model_dump(mode="json")
                run_dir = Path(out_dir) / f"run-{stage}-{share}"
                run_dir.mkdir(parents=True, exist_ok=True)
                w = worker_module.Worker(
                    worker_module.WorkerConfig(spec=spec, data_dir=data_dir, run_dir=str(run_dir)),
                    rank,
                    world,
                )
                w.build()
                losses = [float(w.train_step(step)) for step in range(STEPS)]
                pairs = partitions(w.engine.optimizer)
                assert pairs, stage
                torch.save([own.clone() for _, own in pairs], run_dir / f"own-{rank}.pt")
                results.append(
                    {
                        "stage": stage,
                        "share": share,
                        "rank": rank,
                        "losses": losses,
                        "aliased": [m.data_ptr() == o.data_ptr() for m, o in pairs],
                    }
                )
                del w, pairs
                dist.barrier()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


def test_fp32_zero_updates_the_model_weights_in_place_with_the_same_result(tmp_path):
    write_random_documents(tmp_path / "data", seq_len=32, vocab=300, samples=64)
    mp.spawn(
        _rank,
        args=(2, free_port(), str(tmp_path / "data"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    rows = [r for rank in (0, 1) for r in json.loads((tmp_path / f"rank{rank}.json").read_text())]
    assert len(rows) == 12
    for stage in (1, 2, 3):
        for rank in (0, 1):
            off, on = (
                next(r for r in rows if (r["stage"], r["share"], r["rank"]) == (stage, s, rank))
                for s in (False, True)
            )
            assert not any(off["aliased"]) and all(on["aliased"]), (stage, rank)
            assert on["losses"] == off["losses"], (stage, rank)
            a = torch.load(tmp_path / f"run-{stage}-False" / f"own-{rank}.pt")
            b = torch.load(tmp_path / f"run-{stage}-True" / f"own-{rank}.pt")
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), (stage, rank)
            assert on["losses"][-1] != on["losses"][0]  # the weights did change
