"""Preprocessing with Ray Data: sources -> normalize -> filter -> dedup -> tokenizer ->
tokenize -> split -> pack -> shards + manifest.

Ray Data supplies the parallelism of the per-document stages (stateless tasks, and an
actor pool for tokenizing, which loads the tokenizer once per actor). The output depends
only on the sources and the config, never on the parallelism: documents carry a global
index from the start, duplicates keep their first occurrence, and packing follows that
index. A run whose fingerprint matches the manifest already in the output folder is a
cache hit and does nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import DataNode
from pipeline.data import text as stages
from pipeline.data.shards import (
    FORMAT_VERSION,
    pack_documents,
    pack_pairs,
    read_manifest,
    write_json,
    write_shards,
)
from pipeline.data.sources import invalid_utf8_replaced, load_source, source_fingerprint
from pipeline.data.tokenizer import (
    load_tokenizer,
    special_ids,
    tokenizer_hash,
    train_tokenizer,
)
from pipeline.errors import DataError

Progress = Callable[[str], None]


def fingerprint(data: DataNode, vocab_size: int, paired: bool) -> str:
    """What the output depends on: the resolved data config and what the sources hold."""
    h = hashlib.sha256(f"v{FORMAT_VERSION}|{vocab_size}|{paired}|".encode())
    h.update(data.model_dump_json().encode())
    for source in data.sources:
        h.update(source_fingerprint(source).encode())
    return h.hexdigest()


class _Tokenize:
    """Ray Data actor: loads the tokenizer once, then encodes batch after batch."""

    def __init__(self, tokenizer_json: str, keep: Any) -> None:
        import os

        # One tokenizer thread per actor: Ray already runs one actor per CPU, and the
        # tokenizers' own thread pool on top of that oversubscribes the cores.
        os.environ["RAYON_NUM_THREADS"] = "1"
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_str(tokenizer_json)
        import ray

        self.keep = keep if isinstance(keep, np.ndarray) else ray.get(keep)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        chosen = np.isin(batch["idx"], self.keep, assume_unique=True)  # filtered, deduplicated
        batch = {k: v[chosen] for k, v in batch.items()}
        out = {"idx": batch["idx"], "hash": batch["hash"], "source": batch["source"]}
        for column, name in (("text", "ids"), ("target", "target_ids")):
            if column in batch:
                encoded = self.tok.encode_batch(list(batch[column]), add_special_tokens=False)
                # raw uint32 bytes: one binary column, whatever the lengths in a batch
                out[name] = np.array(
                    [np.asarray(e.ids, dtype=np.uint32).tobytes() for e in encoded], dtype=object
                )
        return out


def _to_ray(hf: Any) -> Any:
    """A Hugging Face dataset as a Ray Dataset. An in-memory (Arrow-backed) dataset goes
    over as its Arrow table: ray.data.from_huggingface re-resolves where the dataset came
    from and can scan the working directory for other splits."""
    import datasets
    import ray

    if isinstance(hf, datasets.Dataset):
        return ray.data.from_arrow(hf.flatten_indices().data.table)
    return ray.data.from_huggingface(hf)  # streaming: read as it streams


def preprocess(
    data: DataNode,
    out_dir: str | Path,
    vocab_size: int,
    paired: bool = False,
    parallelism: int = 2,
    progress: Progress = print,
) -> dict[str, Any]:
    """Run the pipeline into `out_dir` and return its manifest (with `cache_hit`)."""
    import ray

    out = Path(out_dir)
    fp = fingerprint(data, vocab_size, paired)
    if (out / "manifest.json").is_file():
        try:
            manifest = read_manifest(out)
        except DataError:
            manifest = {}
        if manifest.get("fingerprint") == fp:
            progress(f"cache hit: {out} already holds this data ({fp[:12]})")
            return {**manifest, "cache_hit": True}
    started = time.perf_counter()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # order is part of the output's identity
    ctx.enable_progress_bars = False
    # A handful of shuffle partitions, not Ray's default 200: the stages are small and a
    # partition per core keeps every worker busy without paying 200 tasks' overhead.
    ctx.default_hash_shuffle_parallelism = max(2, parallelism * 2)

    progress("loading sources")
    frames, offset, replaced = [], 0, 0
    for i, source in enumerate(data.sources):
        hf = load_source(source, paired)
        replaced += invalid_utf8_replaced(hf)
        n = len(hf)
        hf = hf.add_column("idx", list(range(offset, offset + n)))
        frames.append(
            _to_ray(hf).map_batches(
                lambda b, i=i: {**b, "source": np.full(len(b["idx"]), i)}, batch_format="numpy"
            )
        )
        offset += n
    ds = frames[0] if len(frames) == 1 else frames[0].union(*frames[1:])
    documents_in = offset
    if documents_in == 0:
        raise DataError("the sources hold no documents")

    progress(f"{documents_in} documents: normalize, filter, deduplicate")
    # One fused task stage per block: normalize, tag a drop reason, hash. Order is kept
    # (preserve_order), so no stage below needs a sort of the documents themselves.
    ds = (
        ds.repartition(max(parallelism * 4, 1))
        .map_batches(
            stages.clean,
            fn_kwargs={"min_chars": data.min_chars, "max_chars": data.max_chars},
            concurrency=parallelism,
        )
        .materialize()
    )
    keys = ds.select_columns(["idx", "hash", "drop"]).to_pandas()  # small: no text
    dropped = {reason: int((keys["drop"] == reason).sum()) for reason in stages.FILTER_REASONS}
    if documents_in == sum(dropped.values()):
        raise DataError(
            "the corpus is empty after filtering: "
            + ", ".join(f"{k}={v}" for k, v in dropped.items())
        )
    kept = keys[keys["drop"] == ""].sort_values("idx", kind="stable")
    if data.dedup:
        # Exact dedup: the content hashes were computed in parallel by the stage above;
        # the first occurrence of each is chosen here from the (idx, hash) keys alone,
        # 80 bytes a document, so the texts never move for it.
        kept = kept.drop_duplicates("hash", keep="first")
    keep = np.sort(kept["idx"].to_numpy())
    documents_out = int(keep.size)
    dropped["duplicate"] = documents_in - sum(dropped.values()) - documents_out
    out.mkdir(parents=True, exist_ok=True)
    if (out / "manifest.json").exists():  # a stale output: it stops being valid now
        (out / "manifest.json").unlink()
    tok = _tokenizer(data, ds, keep, vocab_size, out, progress)
    specials = special_ids(tok)

    progress(f"tokenizing {documents_out} documents")
    encoded = ds.map_batches(
        _Tokenize,
        fn_constructor_kwargs={"tokenizer_json": tok.to_str(), "keep": ray.put(keep)},
        concurrency=parallelism,
        batch_size=256,
    )
    splits: dict[str, list[Any]] = {"train": [], "val": []}
    origin: dict[int, tuple[int, str]] = {}  # document -> (source, hash), for the weights
    tokens = 0
    for batch in encoded.iter_batches(batch_size=1024, batch_format="numpy"):
        for j, idx in enumerate(batch["idx"]):
            split = "val" if stages.is_validation(batch["hash"][j], data.val_fraction) else "train"
            ids = np.frombuffer(batch["ids"][j], dtype=np.uint32)
            if paired:
                item = (int(idx), ids, np.frombuffer(batch["target_ids"][j], dtype=np.uint32))
                tokens += len(item[1]) + len(item[2])
            else:
                item = (int(idx), ids)
                tokens += len(ids)
            splits[split].append(item)
            origin[int(idx)] = (int(batch["source"][j]), str(batch["hash"][j]))

    progress("packing and writing shards")
    manifest_splits = {}
    weights = [source.weight for source in data.sources]
    for split, items in splits.items():
        items = apply_weights(items, origin, weights)
        if paired:
            samples = pack_pairs(
                items,
                data.max_source_len or data.seq_len,
                data.max_target_len or data.seq_len,
                specials["eod"],
                specials["pad"],
                specials["bos"],
            )
        else:
            samples = pack_documents(items, data.seq_len + 1, specials["eod"], specials["pad"])
        if (out / split).exists():
            shutil.rmtree(out / split)
        shards = write_shards(out, split, samples, data.samples_per_shard)
        manifest_splits[split] = {
            "documents": len(items),
            "samples": len(samples),
            "shards": shards,
        }
    seconds = time.perf_counter() - started
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fp,
        "paired": paired,
        "seq_len": data.seq_len,
        "max_source_len": data.max_source_len or data.seq_len if paired else None,
        "max_target_len": data.max_target_len or data.seq_len if paired else None,
        "vocab_size": tok.get_vocab_size(),
        "special_ids": specials,
        "tokenizer_sha256": tokenizer_hash(tok),
        "sources": [
            {**s.model_dump(mode="json"), "fingerprint": source_fingerprint(s)}
            for s in data.sources
        ],
        "config": json.loads(data.model_dump_json()),
        "counts": {
            "documents_in": documents_in,
            "documents_out": documents_out,
            "dropped": dropped,
            "tokens": tokens,
            "invalid_utf8_replaced": replaced,
        },
        "splits": manifest_splits,
    }
    write_json(out / "manifest.json", manifest)  # last: the output is complete from now on
    progress(f"wrote {out}: {tokens} tokens in {seconds:.1f} s")
    return {
        **manifest,
        "cache_hit": False,
        "seconds": seconds,
        "tokens_per_second": tokens / max(seconds, 1e-9),
    }


def apply_weights(
    items: list[Any], origin: dict[int, tuple[int, str]], weights: list[float]
) -> list[Any]:
    """Blend sources by weight, as Megatron's blending does: a source of weight w
    contributes floor(w) full passes over its documents plus the fraction w - floor(w) of
    them chosen by content hash (so the choice is stable). Later passes follow the first,
    in document order; with every weight 1 the list is unchanged."""
    if all(w == 1.0 for w in weights):
        return items
    passes: list[list[Any]] = []
    for item in items:
        source, digest = origin[item[0]]
        whole, frac = divmod(weights[source], 1.0)
        copies = int(whole) + (1 if stages.hash_below(digest, frac, salt=1) else 0)
        for copy in range(copies):
            while len(passes) <= copy:
                passes.append([])
            passes[copy].append(item)
    return [item for one_pass in passes for item in one_pass]


def _tokenizer(
    data: DataNode, ds: Any, keep: np.ndarray, vocab_size: int, out: Path, progress: Progress
) -> Any:
    if data.tokenizer.path:
        tok = load_tokenizer(data.tokenizer.path)
    else:
        n = data.tokenizer.sample_documents
        progress(f"training a byte-level BPE of {vocab_size} on up to {n} documents")
        sample = keep[:n]  # the first kept documents in global order
        texts: list[str] = []
        for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
            chosen = np.isin(batch["idx"], sample, assume_unique=True)
            for column in ("text", "target"):
                if column in batch:
                    texts += [str(t) for t in batch[column][chosen]]
        tok = train_tokenizer(texts, vocab_size)
    tok.save(str(out / "tokenizer.json"))
    return tok
