"""Preprocessing with Ray Data: sources -> (normalize, filter, hash, tokenize) -> dedup ->
split -> blend -> pack -> shards + manifest.

The per-document work runs as one Ray Data stage (`text.clean_and_encode`, a task per
block on every CPU; a worker process loads the tokenizer once and keeps it for its later
tasks). The driver takes the blocks back in document order, numbers the documents,
deduplicates on the content hashes the workers computed (the first occurrence stays),
splits by hash and streams each split into its shard writer, so the corpus never has to
fit in memory. The output depends only on the sources and the config, never on the
parallelism. A run whose fingerprint matches the manifest already in the output folder is
a cache hit and does nothing. An output URI (s3://, gs://) is written in a local mirror
folder, then uploaded (pipeline.data.remote).

A tokenizer to train is trained first, on the driver, from the first documents that pass
the filters and deduplication (normalized the same way), so that the corpus is read once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import DataNode
from pipeline.data import remote
from pipeline.data import text as stages
from pipeline.data.shards import (
    FORMAT_VERSION,
    DocumentShardWriter,
    PairShardWriter,
    read_manifest,
    write_json,
)
from pipeline.data.sources import (
    invalid_utf8_replaced,
    load_source,
    source_files,
    source_fingerprint,
)
from pipeline.data.tokenizer import (
    load_tokenizer,
    special_ids,
    tokenizer_hash,
    train_tokenizer,
)
from pipeline.errors import DataError

Progress = Callable[[str], None]


def fingerprint(data: DataNode, vocab_size: int, paired: bool, sources: list[str]) -> str:
    """What the output depends on: the resolved data config and what the sources hold
    (`sources`: their `source_fingerprint`s)."""
    # "bytes": outputs since the manifest counts each split's bytes (the shards are as
    # before); an older output is a cache miss, so bits per byte finds its counts
    h = hashlib.sha256(f"v{FORMAT_VERSION}|bytes|{vocab_size}|{paired}|".encode())
    h.update(data.model_dump_json().encode())
    for source in sources:
        h.update(source.encode())
    return h.hexdigest()


BLOCK_BYTES = 32 << 20  # text per block, at most (a task's work)
STREAM_BLOCK_BYTES = 8 << 20  # a streamed source's blocks: smaller, to start sooner
WINDOW_BLOCKS = 16  # blocks per CPU in one Ray Data execution: bounds the object store


def _windows(hf: Any, parallelism: int) -> Iterator[list[Any]]:
    """One source as lists of Arrow blocks (`text`, and `target`), in document order, each
    list one Ray Data execution. An in-memory (Arrow-backed) dataset is sliced into at
    least 4 blocks per CPU, so that every CPU stays busy to the end; a streaming one is
    read here as it streams, a block at a time."""
    import datasets
    import pyarrow as pa

    per_window = WINDOW_BLOCKS * parallelism
    if isinstance(hf, datasets.Dataset):
        if hf._indices is not None:
            hf = hf.flatten_indices()
        table = hf.data.table
        n = table.num_rows
        k = min(n, max(4 * parallelism, -(-table.nbytes // BLOCK_BYTES)))
        bounds = [i * n // k for i in range(k + 1)]
        blocks = [table.slice(a, b - a) for a, b in itertools.pairwise(bounds)]
        for start in range(0, k, per_window):
            yield blocks[start : start + per_window]
        return
    window: list[Any] = []
    rows: dict[str, list[Any]] = {}
    size = 0
    for batch in hf.iter(batch_size=256):
        for column, values in batch.items():
            rows.setdefault(column, []).extend(values)
        size += sum(len(str(t)) for t in batch["text"])
        if size >= STREAM_BLOCK_BYTES:
            window.append(pa.table(rows))
            rows, size = {}, 0
            if len(window) == per_window:
                yield window
                window = []
    if rows:
        window.append(pa.table(rows))
    if window:
        yield window


class _Consumer:
    """The driver's side of the pass: takes the workers' blocks in document order and
    numbers the documents, counts drops, deduplicates by content hash, splits by hash,
    blends by weight and hands each document to its split's shard writer."""

    def __init__(self, data: DataNode, writers: dict[str, Any], spill: Path) -> None:
        self.data, self.writers, self.spill = data, writers, spill
        self.documents_in = 0
        self.dropped = {reason: 0 for reason in stages.FILTER_REASONS} | {"duplicate": 0}
        self.tokens = 0
        self.documents = {"train": 0, "val": 0}
        # per split: the tokens a model predicts (the target side of a pair) and their UTF-8
        # bytes, every copy counted: bits per byte = loss / ln 2 x predicted / bytes
        self.predicted = {"train": 0, "val": 0}
        self.bytes = {"train": 0, "val": 0}
        self.seen: set[bytes] = set()
        # the later passes over sources of weight above 1, written after the first pass;
        # their documents wait in .npz files under `spill`, not in memory
        self.later: dict[tuple[int, str], list[Path]] = {}

    def take(self, table: Any, source: int) -> None:
        n = table.num_rows
        first = self.documents_in
        self.documents_in += n
        drop = table.column("drop").to_pylist()
        hashes = table.column("hash").to_pylist()
        weight = self.data.sources[source].weight
        whole, frac = divmod(weight, 1.0)
        chosen: dict[str, list[int]] = {"train": [], "val": []}
        copies: dict[str, list[int]] = {"train": [], "val": []}
        for i in range(n):
            if drop[i]:
                self.dropped[drop[i]] += 1
                continue
            if self.data.dedup:
                key = bytes.fromhex(hashes[i][:32])
                if key in self.seen:
                    self.dropped["duplicate"] += 1
                    continue
                self.seen.add(key)
            split = "val" if stages.is_validation(hashes[i], self.data.val_fraction) else "train"
            chosen[split].append(i)
            # Megatron-style blending: floor(w) full passes plus the fraction w - floor(w)
            # of the documents, chosen by content hash (stable)
            copies[split].append(int(whole) + int(stages.hash_below(hashes[i], frac, salt=1)))
        columns = [c for c in ("ids", "target_ids") if c in table.column_names]
        sizes = table.column("bytes").to_numpy()
        for split, rows in chosen.items():
            if not rows:
                continue
            at = np.array(rows, dtype=np.int64)
            parts = []
            for column in columns:
                lists = table.column(column).take(at).combine_chunks()
                parts += [lists.value_lengths().to_numpy(), lists.flatten().to_numpy()]
                self.tokens += int(parts[-1].size)
            count = np.array(copies[split])
            # the last column is the predicted one; a document's end token is predicted too
            self.predicted[split] += int(((parts[-2] + 1) * count).sum())
            self.bytes[split] += int((sizes[at] * count).sum())
            doc_ids = (first + at).astype(np.uint32)
            for copy in range(int(count.max())):
                keep = count > copy
                item = (doc_ids[keep], *_select(parts, keep))
                self.documents[split] += int(keep.sum())
                if copy == 0:
                    self.writers[split].add(*item)
                else:
                    files = self.later.setdefault((copy, split), [])
                    files.append(self.spill / f"pass{copy}-{split}-{len(files):06d}.npz")
                    self.spill.mkdir(exist_ok=True)
                    np.savez(files[-1], *item)

    def close(self) -> dict[str, list[dict[str, Any]]]:
        for copy, split in sorted(self.later):
            for path in self.later[(copy, split)]:
                with np.load(path) as item:
                    self.writers[split].add(*(item[f"arr_{j}"] for j in range(len(item.files))))
                path.unlink()
        return {split: writer.close() for split, writer in self.writers.items()}


def _select(parts: list[np.ndarray], keep: np.ndarray) -> list[np.ndarray]:
    """(lengths, values) pairs of lists, restricted to the lists where `keep` holds."""
    if keep.all():
        return parts
    out = []
    for lengths, values in zip(parts[::2], parts[1::2], strict=True):
        out += [lengths[keep], values[np.repeat(keep, lengths)]]
    return out


def preprocess(
    data: DataNode,
    out_dir: str | Path,
    vocab_size: int,
    paired: bool = False,
    parallelism: int | None = None,
    progress: Progress = print,
) -> dict[str, Any]:
    """Run the pipeline into `out_dir`, a folder or a URI (s3://, gs://), and return its
    manifest (with `cache_hit`).

    `parallelism`: the CPUs to tokenize on (default: all of the Ray cluster's)."""
    uri = str(out_dir) if remote.is_uri(out_dir) else None
    out = remote.mirror_dir(uri) if uri else Path(out_dir)
    # each source's files listed (or fetched) once, then hashed, then read from the same list
    files = [source_files(s) if s.kind == "files" else None for s in data.sources]
    source_fps = [source_fingerprint(s, f) for s, f in zip(data.sources, files, strict=True)]
    fp = fingerprint(data, vocab_size, paired, source_fps)
    if uri is None:
        manifest = _holding(out, fp)
        if manifest:
            progress(f"cache hit: {out} already holds this data ({fp[:12]})")
            return {**manifest, "cache_hit": True}
        return _run(data, out, fp, files, source_fps, vocab_size, paired, parallelism, progress)
    manifest = remote.read_remote_manifest(uri)
    if manifest and manifest.get("fingerprint") == fp:
        progress(f"cache hit: {uri} already holds this data ({fp[:12]})")
        return {**manifest, "cache_hit": True}
    # An earlier run whose upload failed left the output complete in the mirror: upload it.
    manifest = _holding(out, fp) or _run(
        data, out, fp, files, source_fps, vocab_size, paired, parallelism, progress
    )
    progress(f"uploading to {uri}")
    remote.upload(out, uri, manifest)
    progress(f"wrote {uri}")
    return {**manifest, "cache_hit": False}


def _holding(out: Path, fp: str) -> dict[str, Any] | None:
    """The manifest of the complete output in `out` when its fingerprint is `fp`."""
    if not (out / "manifest.json").is_file():
        return None
    try:
        manifest = read_manifest(out)
    except DataError:
        return None
    return manifest if manifest.get("fingerprint") == fp else None


def _run(
    data: DataNode,
    out: Path,
    fp: str,
    files: list[list[tuple[str, Path]] | None],
    source_fps: list[str],
    vocab_size: int,
    paired: bool,
    parallelism: int | None,
    progress: Progress,
) -> dict[str, Any]:
    import ray

    started = time.perf_counter()
    cluster_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    parallelism = parallelism or cluster_cpus
    # A cap on concurrent tasks only where fewer CPUs than the cluster's are asked for:
    # Ray Data's cap holds tasks back between completions (0.4 s of 5 s on the benchmark
    # corpus), and the cluster's CPUs bound the tasks anyway.
    compute = ray.data.TaskPoolStrategy(size=parallelism) if parallelism < cluster_cpus else None
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # documents are numbered as they arrive
    ctx.enable_progress_bars = False
    # Ray Data's per-operator resource reservations keep part of the CPUs idle here (one
    # stage whose outputs go straight to the driver): 6.1 s instead of 5.2 s on the 20 MB
    # benchmark corpus with 2 CPUs.
    ctx.op_resource_reservation_enabled = False

    progress("loading sources")
    sources, replaced = [], 0
    for source, found in zip(data.sources, files, strict=True):
        hf = load_source(source, paired, found)
        replaced += invalid_utf8_replaced(hf)
        sources.append(hf)

    # Everything is written under a staging folder and moved into place at the end, the
    # manifest last: a failed or interrupted run leaves the previous output as it was.
    staging = out / ".staging"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        tok = _tokenizer(data, sources, paired, vocab_size, progress)
        tok.save(str(staging / "tokenizer.json"))
        specials = special_ids(tok)
        tok_digest = tokenizer_hash(tok)
        consumer = _Consumer(data, _writers(data, staging, paired, specials), staging / "passes")
        tokenize = {
            "tokenizer_json": tok.to_str(),
            "tokenizer_digest": tok_digest,
            "min_chars": data.min_chars,
            "max_chars": data.max_chars,
        }
        sized = all(hasattr(hf, "__len__") for hf in sources)  # streamed sources are not
        total = sum(len(hf) for hf in sources) if sized else None
        progress(f"cleaning and tokenizing {total or 'the'} documents on {parallelism} CPUs")
        reported = time.perf_counter()
        for i, window in (
            (i, w) for i, hf in enumerate(sources) for w in _windows(hf, parallelism)
        ):
            encoded = ray.data.from_arrow(window).map_batches(
                stages.clean_and_encode,
                fn_kwargs=tokenize,
                batch_size=None,
                batch_format="pyarrow",
                compute=compute,
            )
            for block in encoded.iter_batches(
                batch_size=None, batch_format="pyarrow", prefetch_batches=0
            ):
                consumer.take(block, i)
                if time.perf_counter() - reported > 10:
                    reported = time.perf_counter()
                    rate = consumer.tokens / (reported - started)
                    of = f"/{total}" if total else ""
                    progress(
                        f"{consumer.documents_in}{of} documents, {consumer.tokens} tokens "
                        f"({rate:,.0f} tokens/s)"
                    )
        if consumer.documents_in == 0:
            raise DataError("the sources hold no documents")
        documents_out = consumer.documents_in - sum(consumer.dropped.values())
        if documents_out + consumer.dropped["duplicate"] == 0:
            raise DataError(
                "the corpus is empty after filtering: "
                + ", ".join(f"{k}={consumer.dropped[k]}" for k in stages.FILTER_REASONS)
            )
        progress("writing the last shards")
        shards = consumer.close()
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
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
        "tokenizer_sha256": tok_digest,
        "sources": [
            {**s.model_dump(mode="json"), "fingerprint": f}
            for s, f in zip(data.sources, source_fps, strict=True)
        ],
        "config": json.loads(data.model_dump_json()),
        "counts": {
            "documents_in": consumer.documents_in,
            "documents_out": documents_out,
            "dropped": consumer.dropped,
            "tokens": consumer.tokens,
            "invalid_utf8_replaced": replaced,
        },
        "splits": {
            split: {
                "documents": consumer.documents[split],
                "samples": consumer.writers[split].samples,
                "predicted_tokens": consumer.predicted[split],
                "bytes": consumer.bytes[split],
                "shards": entries,
            }
            for split, entries in shards.items()
        },
    }
    write_json(out / "manifest.json", manifest)  # last: the output is complete from now on
    progress(f"wrote {out}: {consumer.tokens} tokens in {seconds:.1f} s")
    return {
        **manifest,
        "cache_hit": False,
        "seconds": seconds,
        "tokens_per_second": consumer.tokens / max(seconds, 1e-9),
    }


def _writers(
    data: DataNode, folder: Path, paired: bool, specials: dict[str, int]
) -> dict[str, Any]:
    if paired:
        return {
            split: PairShardWriter(
                folder,
                split,
                data.max_source_len or data.seq_len,
                data.max_target_len or data.seq_len,
                data.samples_per_shard,
                specials,
            )
            for split in ("train", "val")
        }
    return {
        split: DocumentShardWriter(
            folder,
            split,
            data.seq_len + 1,
            data.samples_per_shard,
            specials["eod"],
            specials["pad"],
        )
        for split in ("train", "val")
    }


def _publish(staging: Path, out: Path) -> None:
    """Move a finished run's files from the staging folder into `out`, the old manifest
    gone first so that no reader takes a mix of old and new for a complete output."""
    (out / "manifest.json").unlink(missing_ok=True)
    for name in ("train", "val", "tokenizer.json"):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        if (staging / name).exists():
            os.replace(staging / name, target)
    shutil.rmtree(staging)


def _tokenizer(
    data: DataNode, sources: list[Any], paired: bool, vocab_size: int, progress: Progress
) -> Any:
    """The tokenizer given by path, or a byte-level BPE trained on the first
    `sample_documents` documents that pass the filters and deduplication, in order."""
    if data.tokenizer.path:
        return load_tokenizer(data.tokenizer.path)
    n = data.tokenizer.sample_documents
    progress(f"training a byte-level BPE of {vocab_size} on up to {n} documents")
    columns = ("text", "target") if paired else ("text",)
    texts: list[str] = []
    seen: set[str] = set()
    for hf in sources:
        for batch in hf.iter(batch_size=1024):
            cleaned = stages.clean(
                {c: np.array(stages.as_text(batch[c]), dtype=object) for c in columns},
                data.min_chars,
                data.max_chars,
            )
            for i, reason in enumerate(cleaned["drop"]):
                if reason or (data.dedup and cleaned["hash"][i] in seen):
                    continue
                seen.add(cleaned["hash"][i])
                texts += [cleaned[c][i] for c in columns]
                if len(texts) == n * len(columns):
                    return train_tokenizer(texts, vocab_size)
    return train_tokenizer(texts, vocab_size)
