"""Preprocessing on a Ray cluster: sources -> blocks -> pass 1 (normalize, filter, hash,
tokenize) -> the driver's decisions (dedup) -> pass 2 (split, blend, pack, write shards)
-> manifest.

Each source is cut into blocks by content alone (pipeline/data/blocks.py), and each block
goes through two Ray tasks. Pass 1 encodes the block and keeps its tokens in Ray's object
store; the driver receives 17 bytes a document (a drop code and a content-hash key),
decides deduplication in (source, block, index) order (the first occurrence stays) and
sends back which documents stay: one byte a document. Pass 2 runs where the block's
tokens are, splits and blends by content hash, packs each (split, copy) of the block into
samples and writes its shards itself. The driver writes the manifest last from the
shards' records. Nothing depends on the parallelism: the output is byte-identical on one
CPU or a cluster. A run whose fingerprint matches the manifest already in the output
folder is a cache hit and does nothing.

Files, local or in a bucket, are read by the workers themselves (pipeline/data/reading.py).
What still passes through the driver (docs/data.md): the sources it reads itself (the
demo corpus, hub datasets, csv, JSON arrays: it puts each of their blocks into the
object store), and the set of content keys for deduplication. Workers write the shards:
into a local output folder, which on a cluster must be one every node mounts, or into a
bucket output's staging prefix, which the driver publishes, the manifest last.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import pickle
import shutil
import tempfile
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import DataNode
from pipeline.data import blocks, reading, remote
from pipeline.data import text as stages
from pipeline.data.shards import FORMAT_VERSION, read_manifest, write_json
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
from pipeline.errors import DataError, UserError

Progress = Callable[[str], None]


def fingerprint(data: DataNode, vocab_size: int, paired: bool, sources: list[str]) -> str:
    """What the output depends on: the resolved data config and what the sources hold
    (`sources`: their `source_fingerprint`s)."""
    # the shard format, and the block size: samples are packed per input block
    h = hashlib.sha256(f"v{FORMAT_VERSION}|{BLOCK_BYTES}|{vocab_size}|{paired}|".encode())
    h.update(data.model_dump_json().encode())
    for source in sources:
        h.update(source.encode())
    return h.hexdigest()


BLOCK_BYTES = 1 << 20  # UTF-8 text per input block (a task's work), cut by content alone
AHEAD_PER_CPU = 4  # pass-1 tasks submitted ahead of the driver's decisions, per CPU


def _source_blocks(hf: Any) -> Iterator[Any]:
    """One source as pyarrow tables (`text`, and `target`), in document order, cut by
    content: a dataset in memory or in Arrow files by its rows' sizes, a streamed one as
    it streams (the same cut)."""
    import datasets

    if isinstance(hf, datasets.Dataset):
        if hf._indices is not None:
            hf = hf.flatten_indices()
        table = hf.data.table
        bounds = blocks.cut(blocks.row_bytes(table), BLOCK_BYTES)
        for a, b in itertools.pairwise(bounds):
            yield table.slice(a, b - a)
        return
    yield from blocks.stream_blocks(hf.iter(batch_size=256), BLOCK_BYTES)


class _Driver:
    """The driver's side: what it puts into Ray and gets back (counted in bytes: an Arrow
    table by its buffers, which Ray's serializer writes for a slice alone, anything else
    by its pickle), and its decisions on the documents' keys: drop counts and
    deduplication, first occurrence first."""

    def __init__(self, dedup: bool) -> None:
        self.dedup = dedup
        self.bytes_out = self.bytes_in = self.input_bytes_out = 0
        self.documents_in = 0
        self.dropped = {reason: 0 for reason in stages.FILTER_REASONS} | {"duplicate": 0}
        self.seen: set[bytes] = set()
        self.replaced = 0  # characters of invalid UTF-8, in the blocks workers read

    @staticmethod
    def size(obj: Any) -> int:
        import pyarrow as pa

        if isinstance(obj, pa.Table):
            return int(obj.nbytes)
        return len(pickle.dumps(obj, protocol=5))

    def put(self, obj: Any) -> Any:
        import pyarrow as pa
        import ray

        size = self.size(obj)
        self.bytes_out += size
        if isinstance(obj, pa.Table):  # an input block this process read
            self.input_bytes_out += size
        return ray.put(obj)

    def call(self, fn: Any, *args: Any) -> Any:
        """`fn.remote(*args)`, its arguments counted (an object reference passes as one)."""
        import ray

        self.bytes_out += sum(self.size(a) for a in args if not isinstance(a, ray.ObjectRef))
        return fn.remote(*args)

    def get(self, ref: Any) -> Any:
        """`ray.get`, counted; a user error a task raised is raised here as itself."""
        import ray

        try:
            value = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, UserError):
                raise exc.cause from None
            raise
        self.bytes_in += sum(map(self.size, value)) if isinstance(ref, list) else self.size(value)
        return value

    def decide(self, keys: dict[str, np.ndarray]) -> tuple[np.ndarray, int]:
        """Which of a block's documents stay, and the number of its first document."""
        drop, key = keys["drop"], keys["key"]
        self.replaced += int(keys["replaced"])
        first = self.documents_in
        self.documents_in += len(drop)
        codes, counts = np.unique(drop[drop > 0], return_counts=True)
        for code, count in zip(codes.tolist(), counts.tolist(), strict=True):
            self.dropped[stages.FILTER_REASONS[code - 1]] += count
        keep = drop == 0
        if self.dedup:
            for i in np.flatnonzero(keep).tolist():
                k = key[i].tobytes()
                if k in self.seen:
                    keep[i] = False
                    self.dropped["duplicate"] += 1
                else:
                    self.seen.add(k)
        return keep, first


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
    cpu_started = time.process_time()  # the driver's CPU, listing and hashing the sources too
    uri = str(out_dir) if remote.is_uri(out_dir) else None
    # each source's files listed once, then fingerprinted, then read from the same list
    files = [source_files(s) if s.kind == "files" else None for s in data.sources]
    source_fps = [source_fingerprint(s, f) for s, f in zip(data.sources, files, strict=True)]
    fp = fingerprint(data, vocab_size, paired, source_fps)
    if uri is None:
        manifest = _holding(Path(out_dir), fp)
    else:
        manifest = remote.read_remote_manifest(uri)
        manifest = manifest if manifest and manifest.get("fingerprint") == fp else None
    if manifest:
        progress(f"cache hit: {out_dir} already holds this data ({fp[:12]})")
        return {**manifest, "cache_hit": True}
    return _run(data, out_dir, fp, files, source_fps, vocab_size, paired, parallelism, progress,
                cpu_started)  # fmt: skip


def _holding(out: Path, fp: str) -> dict[str, Any] | None:
    """The manifest of the complete output in `out` when its fingerprint is `fp`."""
    if not (out / "manifest.json").is_file():
        return None
    try:
        manifest = read_manifest(out)
    except DataError:
        return None
    return manifest if manifest.get("fingerprint") == fp else None


class _Folder:
    """A local output folder: everything is written under `<out>/.staging` and moved into
    place at the end, the manifest last, so a failed or interrupted run leaves the
    previous output as it was."""

    def __init__(self, out: Path) -> None:
        self.name = str(out)
        self.out = out
        self.local = out / ".staging"  # the driver's files (the tokenizer)
        if self.local.exists():
            shutil.rmtree(self.local)
        self.local.mkdir(parents=True)
        self.target = str(self.local.resolve())  # where pass 2 writes the shards

    def check(self, records: list[dict[str, Any]]) -> None:
        """Every shard is where this process can see it."""
        for r in records:
            if not (self.local / r["file"]).is_file():
                raise DataError(
                    f"{self.out}: shard {r['file']} written on Ray node {r['node']} is not "
                    "here: on a cluster the output folder must be one every node mounts "
                    "(or a bucket URI)"
                )

    def publish(self, manifest: dict[str, Any]) -> None:
        """Move the run's files into place, the old manifest gone first so that no reader
        takes a mix of old and new for a complete output; the new one written last."""
        (self.out / "manifest.json").unlink(missing_ok=True)
        for name in ("train", "val", "tokenizer.json"):
            target = self.out / name
            if target.is_dir():
                shutil.rmtree(target)
            if (self.local / name).exists():
                os.replace(self.local / name, target)
        shutil.rmtree(self.local)
        write_json(self.out / "manifest.json", manifest)

    def discard(self) -> None:
        shutil.rmtree(self.local, ignore_errors=True)


class _Bucket:
    """An output in a bucket: workers upload the shards under `<uri>/.staging/`; at the
    end the driver uploads the tokenizer there and publishes it all, copied within the
    storage, the manifest last (pipeline.data.remote.publish). A failed run leaves the
    previous output as it was; the next run empties the staging prefix first."""

    def __init__(self, uri: str) -> None:
        self.name = self.uri = uri
        self.target = remote.join(uri, ".staging")
        remote.clear(self.target)  # what a run cut short left there
        self.local = Path(tempfile.mkdtemp(prefix="attnpipe-preprocess-"))

    def check(self, records: list[dict[str, Any]]) -> None:
        staged = remote.staged_files(self.target)
        for r in records:
            if r["file"] not in staged:
                raise DataError(f"{self.uri}: shard {r['file']} from node {r['node']} is missing")

    def publish(self, manifest: dict[str, Any]) -> None:
        try:
            tokenizer = self.local / "tokenizer.json"
            remote.put_file(tokenizer, remote.join(self.target, "tokenizer.json"))
            write_json(self.local / "manifest.json", manifest)
            remote.publish(self.target, self.uri, manifest, self.local / "manifest.json")
        finally:
            shutil.rmtree(self.local, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.local, ignore_errors=True)
        with contextlib.suppress(DataError):  # out of reach: the next run empties it
            remote.clear(self.target)


def _run(
    data: DataNode,
    out_dir: str | Path,
    fp: str,
    files: list[list[reading.SourceFile] | None],
    source_fps: list[str],
    vocab_size: int,
    paired: bool,
    parallelism: int | None,
    progress: Progress,
    cpu_started: float,
) -> dict[str, Any]:
    import ray

    started = time.perf_counter()
    cluster_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    parallelism = min(parallelism or cluster_cpus, cluster_cpus)
    # fewer CPUs than the cluster's: each task asks for a larger share, so that at most
    # `parallelism` run at once; never more than the largest node has, or none would run
    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)
    options: dict[str, Any] = {"num_cpus": max(1, min(cluster_cpus / parallelism, largest))}
    encode = ray.remote(blocks.encode_block).options(num_returns=2, **options)
    write = ray.remote(blocks.write_block).options(**options)

    # Each source as the blocks workers read (files), or a dataset read here
    progress("listing sources")
    inputs: list[Any] = []
    replaced = 0
    for source, found in zip(data.sources, files, strict=True):
        plan = None if found is None else reading.plan_blocks(source, found, paired, BLOCK_BYTES)
        if plan is None:
            hf = load_source(source, paired, found)
            replaced += invalid_utf8_replaced(hf)
        inputs.append(plan if plan is not None else hf)

    driver = _Driver(data.dedup)
    uri = str(out_dir) if remote.is_uri(out_dir) else None
    output = _Bucket(uri) if uri else _Folder(Path(out_dir))
    try:
        tok = _tokenizer(data, inputs, paired, vocab_size, progress, driver)
        tok.save(str(output.local / "tokenizer.json"))
        specials = special_ids(tok)
        tok_digest = tokenizer_hash(tok)
        # once, compressed (a fifth of the JSON); every pass-1 task of the run reads it
        tokenizer = driver.put(zlib.compress(tok.to_str().encode(), 6))
        pack = _packing(data, paired, specials)
        folder = output.target
        sized = all(hasattr(i, "__len__") and not isinstance(i, list) for i in inputs)
        total = sum(len(i) for i in inputs) if sized else None  # a dataset in memory
        progress(f"cleaning and tokenizing {total or 'the'} documents on {parallelism} CPUs")
        pending: deque[tuple[int, int, Any, Any]] = deque()
        writes: list[Any] = []
        reported = time.perf_counter()

        def decide_next() -> None:
            source, block, keys, encoded = pending.popleft()
            keep, first = driver.decide(driver.get(keys))
            weight = data.sources[source].weight
            args = (keep, first, source, block, weight, data.val_fraction, folder, pack)
            writes.append(driver.call(write, encoded, *args))

        for source, item in enumerate(inputs):
            read_here = not isinstance(item, list)
            for block, table in enumerate(_source_blocks(item) if read_here else item):
                keys, encoded = driver.call(
                    encode, driver.put(table) if read_here else table, tokenizer, tok_digest,
                    data.min_chars, data.max_chars, block,
                )  # fmt: skip
                pending.append((source, block, keys, encoded))
                while len(pending) >= AHEAD_PER_CPU * parallelism:
                    decide_next()
                if time.perf_counter() - reported > 10:
                    reported = time.perf_counter()
                    of = f"/{total}" if total else ""
                    progress(f"{driver.documents_in}{of} documents read")
        while pending:
            decide_next()
        if driver.documents_in == 0:
            raise DataError("the sources hold no documents")
        documents_out = driver.documents_in - sum(driver.dropped.values())
        if documents_out + driver.dropped["duplicate"] == 0:
            raise DataError(
                "the corpus is empty after filtering: "
                + ", ".join(f"{k}={driver.dropped[k]}" for k in stages.FILTER_REASONS)
            )
        progress(f"writing the shards of {len(writes)} blocks")
        written = driver.get(writes)
        output.check([r for w in written for r in w["shards"]])
        tokens = sum(w["counts"]["tokens"] for w in written)
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
                "documents_in": driver.documents_in,
                "documents_out": documents_out,
                "dropped": driver.dropped,
                "tokens": tokens,
                "invalid_utf8_replaced": replaced + driver.replaced,
            },
            "splits": _splits(written),
        }
        output.publish(manifest)  # the manifest last: the output is complete from then on
    except BaseException:
        output.discard()
        raise
    seconds = time.perf_counter() - started
    progress(f"wrote {output.name}: {tokens} tokens in {seconds:.1f} s")
    return {
        **manifest,
        "cache_hit": False,
        "seconds": seconds,
        "tokens_per_second": tokens / max(seconds, 1e-9),
        "driver": {
            "bytes_out": driver.bytes_out,
            "input_bytes_out": driver.input_bytes_out,
            "bytes_in": driver.bytes_in,
            "cpu_seconds": time.process_time() - cpu_started,
            "blocks": len(written),
            "nodes": sorted({r["node"] for w in written for r in w["shards"] if r["node"]}),
        },
    }


def _packing(data: DataNode, paired: bool, specials: dict[str, int]) -> dict[str, Any]:
    """How pass 2 packs a block's documents into samples."""
    return {
        "paired": paired,
        "block": data.seq_len + 1,
        "max_source": data.max_source_len or data.seq_len,
        "max_target": data.max_target_len or data.seq_len,
        "samples_per_shard": data.samples_per_shard,
        "eod": specials["eod"],
        "pad": specials["pad"],
        "bos": specials["bos"],
    }


def _splits(written: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's splits from pass 2's records: each split's shards in (copy, source,
    block, k) order, and its counts."""
    splits = {}
    for split in ("train", "val"):
        records = sorted(
            (r for w in written for r in w["shards"] if r["split"] == split),
            key=lambda r: (r["copy"], r["source"], r["block"], r["k"]),
        )
        counts = {
            key: sum(w["counts"][split][key] for w in written)
            for key in ("documents", "predicted_tokens", "bytes")
        }
        splits[split] = {
            "documents": counts["documents"],
            "samples": sum(r["samples"] for r in records),
            "predicted_tokens": counts["predicted_tokens"],
            "bytes": counts["bytes"],
            "shards": [{k: r[k] for k in ("file", "samples", "sha256")} for r in records],
        }
    return splits


def _tokenizer(
    data: DataNode,
    inputs: list[Any],
    paired: bool,
    vocab_size: int,
    progress: Progress,
    driver: _Driver,
) -> Any:
    """The tokenizer given by path, or a byte-level BPE trained on the first
    `sample_documents` documents that pass the filters and deduplication, in order: in a
    Ray task that reads them itself when every source is read by workers, else here."""
    import ray
    from tokenizers import Tokenizer

    if data.tokenizer.path:
        return load_tokenizer(data.tokenizer.path)
    n = data.tokenizer.sample_documents
    progress(f"training a byte-level BPE of {vocab_size} on up to {n} documents")
    if all(isinstance(item, list) for item in inputs):
        plan = [block for item in inputs for block in item]
        task = ray.remote(_train_on_blocks)
        return Tokenizer.from_str(
            driver.get(driver.call(task, driver.put(plan), data, paired, vocab_size))
        )
    return _train_on(_tables(inputs), data, paired, vocab_size)


def _tables(inputs: list[Any]) -> Iterator[Any]:
    """Every block of the sources as a pyarrow table, in order, read here."""
    for item in inputs:
        if isinstance(item, list):
            yield from (reading.read_block(block)[0] for block in item)
        else:
            yield from _source_blocks(item)


def _train_on_blocks(plan: list[Any], data: DataNode, paired: bool, vocab_size: int) -> str:
    """A worker's tokenizer training: it reads the blocks itself, as far as the sample goes."""
    return str(_train_on(_tables([plan]), data, paired, vocab_size).to_str())


def _train_on(tables: Iterator[Any], data: DataNode, paired: bool, vocab_size: int) -> Any:
    n = data.tokenizer.sample_documents
    columns = ("text", "target") if paired else ("text",)
    texts: list[str] = []
    seen: set[str] = set()
    for table in tables:
        cleaned = stages.clean(
            {
                c: np.array(stages.as_text(table.column(c).to_pylist()), dtype=object)
                for c in columns
            },
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
