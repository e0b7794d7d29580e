"""Preprocessing throughput, side by side in one run, on the same corpus and tokenizer:

- attnpipe's pipeline on Ray (normalize, filter, dedup, tokenize, split, pack, shards;
  pipeline/data/preprocess.py) with 2 CPUs and with 1 CPU;
- the baseline: Hugging Face datasets `.map(batched=True, num_proc=2)` tokenizing and
  packing the same documents.

The corpus is the demo corpus, repeated with a distinct first line per copy (so that
deduplication keeps every copy) until it passes --min-mb megabytes.

What the driver carries, from the pipeline's own accounting (`preprocess()["driver"]`):
every object it puts into Ray and every task argument it passes by value (an Arrow table
counted by its buffers, anything else by its pickle), every value it gets back, and its
process's CPU time (user + system), each per MB of corpus: `driver_bytes_out_per_mb`,
`driver_bytes_in_per_mb`, `driver_busy_s_per_mb` (the 2-CPU runs; min and median).

Protocol: Ray is started once per CPU count, as a cluster is; the first run on it is
recorded apart as `cold` (its worker processes import the libraries), the next --repeats
runs are the measurement. The baseline's first run is recorded apart the same way, and
its measured runs alternate with the 2-CPU pipeline's. Ratios use the best run of each
side; medians are in the JSON too.

    python benchmarks/preprocess.py --out benchmarks/results/preprocess.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.preprocess import BLOCK_BYTES

SEQ_LEN = 256


def build_corpus(folder: Path, min_mb: float) -> tuple[Path, int]:
    from pipeline.data.sources import demo_documents

    docs = demo_documents()
    path = folder / "corpus.jsonl"
    size, copies = 0, 0
    with path.open("w") as f:
        while size < min_mb * 1e6:
            for i, doc in enumerate(docs):
                line = json.dumps({"text": f"Copy {copies}, scene {i}.\n{doc}"}) + "\n"
                f.write(line)
                size += len(line.encode())
            copies += 1
    return path, size


def run_pipeline(corpus: Path, tokenizer: Path, out: Path, cpus: int) -> dict[str, Any]:
    """One pipeline run on the Ray instance that is up (with `cpus` CPUs)."""
    import shutil

    from pipeline.config import DataNode, SourceNode
    from pipeline.data.preprocess import preprocess

    shutil.rmtree(out, ignore_errors=True)
    node = DataNode(
        sources=[SourceNode(kind="files", path=str(corpus))],
        seq_len=SEQ_LEN,
        tokenizer={"path": str(tokenizer)},
        samples_per_shard=4096,
    )
    start = time.perf_counter()
    manifest = preprocess(node, out, vocab_size=8192, parallelism=cpus, progress=lambda m: None)
    seconds = time.perf_counter() - start
    tokens = manifest["counts"]["tokens"]
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_second": tokens / seconds,
        "driver": manifest["driver"],
    }


def padding_share(out: Path) -> dict[str, float]:
    """The share of each split's sample tokens that are padding (each block ends in one
    partly filled sample per split and copy)."""
    from pipeline.data.shards import PAD_DOC, read_manifest

    shares = {}
    for split, entry in read_manifest(out)["splits"].items():
        padded = total = 0
        for shard in entry["shards"]:
            docs = np.load(out / shard["file"], mmap_mode="r")[:, 1]
            padded, total = padded + int((docs == PAD_DOC).sum()), total + docs.size
        shares[split] = padded / max(total, 1)
    return shares


def run_datasets_baseline(corpus: Path, tokenizer: Path, procs: int) -> dict[str, Any]:
    import datasets
    from tokenizers import Tokenizer

    datasets.disable_progress_bars()
    tok_json = Tokenizer.from_file(str(tokenizer)).to_str()

    def encode_and_pack(batch: dict[str, list[str]]) -> dict[str, list[Any]]:
        tok = Tokenizer.from_str(tok_json)
        eod = tok.token_to_id("<|endoftext|>")
        encoded = tok.encode_batch_fast(batch["text"], add_special_tokens=False)  # as attnpipe
        flat = np.concatenate([np.append(np.asarray(e.ids, dtype=np.uint32), eod) for e in encoded])
        n = -(-flat.size // 257)
        blocks = np.pad(flat, (0, n * 257 - flat.size)).reshape(n, 257)
        return {"input_ids": list(blocks), "n_tokens": [int(flat.size)] + [0] * (n - 1)}

    start = time.perf_counter()
    ds = datasets.load_dataset(
        "json", data_files=str(corpus), split="train", cache_dir=str(corpus.parent / "hf-cache")
    )
    packed = ds.map(
        encode_and_pack,
        batched=True,
        num_proc=procs,
        remove_columns=ds.column_names,
        load_from_cache_file=False,
    )
    tokens = int(sum(packed["n_tokens"]))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min-mb", type=float, default=100.0)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/preprocess.json")
    args = ap.parse_args()

    import ray

    from pipeline.data.sources import demo_documents
    from pipeline.data.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        corpus, size = build_corpus(folder, args.min_mb)
        tokenizer = folder / "tokenizer.json"
        train_tokenizer(demo_documents(), 8192).save(str(tokenizer))
        print(f"corpus: {size / 1e6:.1f} MB", file=sys.stderr)
        runs: dict[str, list[dict[str, Any]]] = {
            "pipeline_2cpu": [],
            "pipeline_1cpu": [],
            "datasets_num_proc_2": [],
        }
        cold: dict[str, dict[str, Any]] = {}

        def log(name: str, run: dict[str, Any]) -> dict[str, Any]:
            print(f"{name}: {run['seconds']:.2f} s", file=sys.stderr)
            return run

        for cpus in (2, 1):
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            try:
                name = f"pipeline_{cpus}cpu"
                out = folder / "out"
                cold[name] = log(f"{name} (cold)", run_pipeline(corpus, tokenizer, out, cpus))
                if cpus == 2:
                    base = run_datasets_baseline(corpus, tokenizer, 2)
                    cold["datasets_num_proc_2"] = log("datasets (cold)", base)
                for _ in range(args.repeats):
                    if cpus == 2:
                        base = run_datasets_baseline(corpus, tokenizer, 2)
                        runs["datasets_num_proc_2"].append(log("datasets", base))
                    runs[name].append(log(name, run_pipeline(corpus, tokenizer, out, cpus)))
            finally:
                ray.shutdown()
        padding = padding_share(folder / "out")

    def best(name: str) -> float:
        return max(x["tokens_per_second"] for x in runs[name])

    def median(name: str) -> float:
        return statistics.median(x["tokens_per_second"] for x in runs[name])

    def cold_tps(name: str) -> float:
        return float(cold[name]["tokens_per_second"])

    def per_mb(key: str) -> dict[str, float]:
        values = [x["driver"][key] / (size / 1e6) for x in runs["pipeline_2cpu"]]
        return {"min": min(values), "median": statistics.median(values)}

    result = {
        "corpus_mb": size / 1e6,
        "cpu_count": os.cpu_count(),
        "repeats": args.repeats,
        "protocol": "Ray started once per CPU count; first run apart (cold); best of repeats",
        "runs": runs,
        "cold": cold,
        "tokens_per_second_max": {k: best(k) for k in runs},
        "tokens_per_second_median": {k: median(k) for k in runs},
        "speedup_vs_datasets": best("pipeline_2cpu") / best("datasets_num_proc_2"),
        "scaling_1_to_2_cpus": best("pipeline_2cpu") / best("pipeline_1cpu"),
        "speedup_vs_datasets_median": median("pipeline_2cpu") / median("datasets_num_proc_2"),
        "scaling_1_to_2_cpus_median": median("pipeline_2cpu") / median("pipeline_1cpu"),
        "speedup_vs_datasets_cold": cold_tps("pipeline_2cpu") / cold_tps("datasets_num_proc_2"),
        "scaling_1_to_2_cpus_cold": cold_tps("pipeline_2cpu") / cold_tps("pipeline_1cpu"),
        "driver_bytes_in_per_mb": per_mb("bytes_in"),
        "driver_bytes_out_per_mb": per_mb("bytes_out"),
        "driver_busy_s_per_mb": per_mb("cpu_seconds"),
        "blocks": runs["pipeline_2cpu"][0]["driver"]["blocks"],
        "block_bytes": BLOCK_BYTES,
        "seq_len": SEQ_LEN,
        "padding_share": padding,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(
        json.dumps(
            {
                k: result[k]
                for k in result
                if k.startswith(("speedup", "scaling", "driver"))
                or k in ("tokens_per_second_max", "corpus_mb", "padding_share", "blocks")
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
