"""The two passes of preprocessing, as the work of one input block (pipeline/data/preprocess.py
schedules them as Ray tasks).

Input blocks are cut by content alone: a block closes after the row at which its UTF-8
text (and target) reaches `limit` bytes, so the cut never depends on the number of CPUs
or nodes, and a streamed source is cut where the same source read whole is.

Pass 1, `encode_block`: normalize, filter, hash and tokenize a block. Its tokens stay
where it ran (in Ray's object store); the driver receives only each document's keys: a
drop code and the first 16 bytes of its content hash (17 bytes a document).

The driver decides deduplication on those keys (first occurrence in (source, block,
index) order) and sends back which documents stay. Pass 2, `write_block`, runs where the
tokens are: it splits the block's kept documents by content hash, makes the copies a
source's weight asks for (also by hash), packs each (split, copy) into samples and writes
its shards, named from (split, copy, source, block, k), into the output folder or, for
an output in a bucket, into the run's staging prefix there (each shard written to a
local temporary file, then uploaded). It returns their records and the block's counts;
the driver writes the manifest last from those records.
"""

from __future__ import annotations

import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import remote
from pipeline.data import text as stages
from pipeline.data.reading import FileBlock, read_block
from pipeline.data.shards import join_documents, pack_pairs, samples_of, write_shard

KEY_BYTES = 16  # of a document's sha256 content hash, for deduplication


# --------------------------------------------------------------------------- cutting


def row_bytes(table: Any) -> np.ndarray:
    """The UTF-8 bytes of each row's `text` (plus `target`) of a pyarrow table; null is 0."""
    import pyarrow as pa
    import pyarrow.compute as pc

    total = np.zeros(table.num_rows, dtype=np.int64)
    for name in ("text", "target"):
        if name in table.column_names:
            column = table.column(name)
            if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
                column = pc.cast(column, pa.string())
            total += pc.binary_length(column).fill_null(0).to_numpy(zero_copy_only=False)
    return total


def cut(sizes: np.ndarray, limit: int) -> list[int]:
    """Block bounds [0, ..., n] over rows of `sizes` bytes: each block closes after the
    row at which its bytes reach `limit` (the last one may hold fewer)."""
    ends = np.cumsum(sizes)
    bounds, base = [0], 0
    while bounds[-1] < len(sizes):
        end = min(int(np.searchsorted(ends, base + limit, side="left")) + 1, len(sizes))
        bounds.append(end)
        base = int(ends[end - 1])
    return bounds


def stream_blocks(batches: Iterable[dict[str, list[Any]]], limit: int) -> Iterator[Any]:
    """A streamed source's rows (batches of columns) as pyarrow tables cut as `cut` cuts
    the same rows read whole."""
    import pyarrow as pa

    rows: dict[str, list[Any]] = {}
    size = 0
    for batch in batches:
        columns = list(batch)
        for i in range(len(batch[columns[0]])):
            for column in columns:
                rows.setdefault(column, []).append(batch[column][i])
            size += sum(
                len(stages.as_text([batch[c][i]])[0].encode())
                for c in ("text", "target")
                if c in batch
            )
            if size >= limit:
                yield pa.table(rows)
                rows, size = {}, 0
    if rows:
        yield pa.table(rows)


# --------------------------------------------------------------------------- pass 1


def encode_block(
    table: Any,
    tokenizer: bytes,
    tokenizer_digest: str,
    min_chars: int,
    max_chars: int | None,
    block: int = 0,
) -> tuple[dict[str, np.ndarray], Any]:
    """(keys, encoded) of input block `block` (a table, or a FileBlock read here), with
    the tokenizer's JSON, zlib-compressed: the keys
    the driver needs, {"drop": uint8 (0: kept, else 1 + the index of the reason in
    FILTER_REASONS), "key": the first KEY_BYTES bytes of each content hash, "replaced":
    characters of invalid UTF-8 replaced in reading}; and the encoded table (`hash`,
    `ids`, `target_ids`, `bytes`) that stays in the object store for pass 2."""
    _fault("encode", block)
    replaced = 0
    if isinstance(table, FileBlock):  # a block of files: read here, not by the driver
        table, replaced = read_block(table)
    encoded = stages.clean_and_encode(
        table,
        tokenizer_json=zlib.decompress(tokenizer).decode(),
        tokenizer_digest=tokenizer_digest,
        min_chars=min_chars,
        max_chars=max_chars,
    )
    codes = {reason: i + 1 for i, reason in enumerate(stages.FILTER_REASONS)}
    drop = np.array([codes.get(r, 0) for r in encoded.column("drop").to_pylist()], np.uint8)
    hashes = encoded.column("hash").to_pylist()
    key = np.frombuffer(
        b"".join(bytes.fromhex(h[: 2 * KEY_BYTES]) for h in hashes), dtype=f"V{KEY_BYTES}"
    )
    return {"drop": drop, "key": key, "replaced": replaced}, encoded.drop_columns(["drop"])


# --------------------------------------------------------------------------- pass 2


def write_block(
    encoded: Any,
    keep: np.ndarray,
    first: int,
    source: int,
    block: int,
    weight: float,
    val_fraction: float,
    out_dir: str,
    pack: dict[str, Any],
) -> dict[str, Any]:
    """Write the shards of one block's kept documents (`keep`, one bool a document; the
    block's documents numbered from `first`) under `out_dir`, a folder or a URI. Returns
    {"shards": records, "counts"}: a record is a manifest entry (file, samples, sha256)
    plus split, copy, source, block, k and the Ray node that wrote it; counts per split
    are documents (every copy), predicted tokens and bytes (every copy, for bits per
    byte), and the block's tokens (each kept document once)."""
    _fault("write", block)
    hashes = encoded.column("hash").to_pylist()
    whole, frac = divmod(weight, 1.0)
    val = np.array([stages.is_validation(h, val_fraction) for h in hashes], dtype=bool)
    copies = np.array([int(whole) + int(stages.hash_below(h, frac, salt=1)) for h in hashes])
    columns = [c for c in ("ids", "target_ids") if c in encoded.column_names]
    sizes = encoded.column("bytes").to_numpy()
    node = _node_id()
    records: list[dict[str, Any]] = []
    counts: dict[str, Any] = {"tokens": 0}
    uri = out_dir if remote.is_uri(out_dir) else None
    # a shard for a bucket is written to a local file first, then uploaded
    folder = Path(tempfile.mkdtemp(prefix="attnpipe-shards-") if uri else out_dir)
    try:
        for split, in_split in (("train", ~val), ("val", val)):
            rows = np.flatnonzero(keep & in_split)
            split_counts = {"documents": 0, "predicted_tokens": 0, "bytes": 0}
            counts[split] = split_counts
            if not rows.size:
                continue
            parts = []  # (lengths, values) of each token column, the kept rows only
            for column in columns:
                lists = encoded.column(column).take(rows).combine_chunks()
                parts.append((lists.value_lengths().to_numpy(), lists.flatten().to_numpy()))
                counts["tokens"] += int(parts[-1][1].size)
            doc_ids = (first + rows).astype(np.uint32)
            for copy in range(int(copies[rows].max())):
                chosen = copies[rows] > copy
                selected = [_select(lengths, values, chosen) for lengths, values in parts]
                split_counts["documents"] += int(chosen.sum())
                # the last column is the predicted one; a document's end token is too
                split_counts["predicted_tokens"] += int((selected[-1][0] + 1).sum())
                split_counts["bytes"] += int(sizes[rows[chosen]].sum())
                samples = _pack(doc_ids[chosen], selected, pack)
                per = pack["samples_per_shard"]
                for k, start in enumerate(range(0, len(samples), per)):
                    name = f"c{copy:03d}-s{source:03d}-b{block:07d}-{k:04d}"
                    entry = write_shard(folder, split, name, samples[start : start + per])
                    if uri:
                        remote.put_file(folder / entry["file"], remote.join(uri, entry["file"]))
                        (folder / entry["file"]).unlink()
                    records.append(
                        {**entry, "split": split, "copy": copy, "source": source,
                         "block": block, "k": k, "node": node}
                    )  # fmt: skip
    finally:
        if uri:
            shutil.rmtree(folder, ignore_errors=True)
    return {"shards": records, "counts": counts}


def _select(lengths: np.ndarray, values: np.ndarray, keep: np.ndarray) -> tuple[Any, Any]:
    """The lists (given as lengths and concatenated values) where `keep` holds."""
    if keep.all():
        return lengths, values
    return lengths[keep], values[np.repeat(keep, lengths)]


def _pack(doc_ids: np.ndarray, parts: list[tuple[Any, Any]], pack: dict[str, Any]) -> Any:
    if pack["paired"]:
        (src_len, src), (tgt_len, tgt) = parts
        sources = np.split(src, np.cumsum(src_len)[:-1])
        targets = np.split(tgt, np.cumsum(tgt_len)[:-1])
        return pack_pairs(
            zip(doc_ids.tolist(), sources, targets, strict=True),
            pack["max_source"],
            pack["max_target"],
            pack["eod"],
            pack["pad"],
            pack["bos"],
        )
    (lengths, values) = parts[0]
    tokens, ids = join_documents(doc_ids, lengths, values, pack["eod"])
    return samples_of(tokens, ids, pack["block"], pack["pad"])


def _node_id() -> str | None:
    """The Ray node this runs on (None outside Ray: a test calls the function itself)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


FAULT = "ATTNPIPE_FAULT_HOLD"  # "<pass>:<block>:<marker file>", for the fault tests only


def _fault(stage: str, block: int) -> None:
    """A fault test's hook: the first attempt of pass `stage` on block `block` writes its
    process id to the marker file and waits there to be killed; a retry (the marker
    exists) goes on."""
    import os

    wanted = os.environ.get(FAULT, "").split(":", 2)
    if len(wanted) != 3 or wanted[:2] != [stage, str(block)] or Path(wanted[2]).exists():
        return
    import time

    Path(wanted[2]).write_text(str(os.getpid()))
    time.sleep(120)
