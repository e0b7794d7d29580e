"""Packing into fixed-length samples, and the on-disk shard format.

A preprocessed split is a folder of shards plus one manifest.json for the whole output:

    <out>/manifest.json          written last: its presence means the output is complete
    <out>/tokenizer.json
    <out>/train/shard-00000.npy  uint32 (samples, 2, seq_len + 1): [:, 0] token ids,
    <out>/val/shard-00000.npy                                     [:, 1] document ids

Document ids are global document indices, so they only grow along a sample; the padding
at the tail of the last sample has document id PAD_DOC. Paired (seq2seq) shards hold
(samples, 2, max_source_len + max_target_len + 1): the source, then BOS + target, padded.
Every file is written under a temporary name and renamed into place, so a crash never
leaves a half-written shard under its final name.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError

PAD_DOC = np.iinfo(np.uint32).max
FORMAT_VERSION = 1


def pack_documents(
    docs: Iterable[tuple[int, Sequence[int]]], block: int, eod: int, pad: int
) -> np.ndarray:
    """(samples, 2, block) uint32 from (document id, token ids) in order: each document is
    followed by `eod` and carries its id on every token (EOD included); a document longer
    than a block continues into the next; the last block is padded. Nothing is dropped."""
    tokens, ids = [], []
    for doc_id, toks in docs:
        arr = np.asarray(toks, dtype=np.uint32)
        tokens.append(np.append(arr, np.uint32(eod)))
        ids.append(np.full(arr.size + 1, doc_id, dtype=np.uint32))
    if not tokens:
        return np.zeros((0, 2, block), dtype=np.uint32)
    flat_t, flat_d = np.concatenate(tokens), np.concatenate(ids)
    n = -(-flat_t.size // block)
    tail = n * block - flat_t.size
    tokens_nb = np.pad(flat_t, (0, tail), constant_values=pad).reshape(n, block)
    docs_nb = np.pad(flat_d, (0, tail), constant_values=PAD_DOC).reshape(n, block)
    return np.stack([tokens_nb, docs_nb], axis=1)


def pack_pairs(
    pairs: Iterable[tuple[int, Sequence[int], Sequence[int]]],
    max_source: int,
    max_target: int,
    eod: int,
    pad: int,
    bos: int,
) -> np.ndarray:
    """(samples, 2, max_source + max_target + 1): source + EOD and BOS + target + EOD,
    truncated to their lengths and padded; rows grouped by length (sorted by source, then
    target length, stable) so batches waste little padding."""
    rows = []
    for pair_id, src, tgt in pairs:
        s = [*list(src)[: max_source - 1], eod]
        t = [bos, *list(tgt)[: max_target - 1], eod]
        rows.append((len(s), len(t), pair_id, s, t))
    rows.sort(key=lambda r: (r[0], r[1]))
    out = np.full((len(rows), 2, max_source + max_target + 1), pad, dtype=np.uint32)
    out[:, 1] = PAD_DOC
    for i, (ls, lt, pair_id, s, t) in enumerate(rows):
        out[i, 0, :ls] = s
        out[i, 0, max_source : max_source + lt] = t
        out[i, 1, :ls] = pair_id
        out[i, 1, max_source : max_source + lt] = pair_id
    return out


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_shards(
    out_dir: Path, split: str, samples: np.ndarray, per_shard: int
) -> list[dict[str, Any]]:
    """Write `samples` as shards of `per_shard` rows; returns their manifest entries."""
    folder = out_dir / split
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, start in enumerate(range(0, len(samples), per_shard)):
        path = folder / f"shard-{i:05d}.npy"
        part = np.ascontiguousarray(samples[start : start + per_shard])
        _atomic_write(path, lambda f, part=part: np.save(f, part, allow_pickle=False))
        entries.append(
            {"file": f"{split}/{path.name}", "samples": len(part), "sha256": sha256_file(path)}
        )
    return entries


def write_json(path: Path, obj: Any) -> None:
    data = json.dumps(obj, indent=1, sort_keys=True).encode()
    _atomic_write(path, lambda f: f.write(data))


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{path}: no manifest: the folder holds no complete preprocessed output"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path}: corrupt manifest") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: format version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    return manifest


def open_shard(out_dir: Path, entry: dict[str, Any], verify: bool = True) -> np.ndarray:
    """Memory-map one shard, after checking its checksum and shape."""
    path = out_dir / entry["file"]
    if not path.is_file():
        raise DataError(f"{path}: shard missing")
    if verify and sha256_file(path) != entry["sha256"]:
        raise DataError(f"{path}: shard is corrupt or truncated (checksum mismatch)")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: shard is unreadable: {exc}") from None
    if arr.ndim != 3 or arr.shape[0] != entry["samples"] or arr.shape[1] != 2:
        raise DataError(
            f"{path}: shard has shape {arr.shape}, manifest says {entry['samples']} samples"
        )
    return arr
