"""Packing into fixed-length samples, and the on-disk shard format (version 2).

A preprocessed split is a folder of shards plus one manifest.json for the whole output:

    <out>/manifest.json    written last: its presence means the output is complete
    <out>/tokenizer.json
    <out>/train/shard-c000-s000-b0000000-0000.npy   uint32 (samples, 2, seq_len + 1):
    <out>/val/shard-...                             [:, 0] token ids, [:, 1] document ids

Each input block's documents of one split and one blending copy are packed apart
(pipeline/data/blocks.py) and written by the worker that holds them, as shards named from
(copy, source, block, k); the manifest lists a split's shards in that order, and a
sample's index is its place in that list. Document ids are global document indices, so
they only grow along a sample; the padding at the tail of a block's last sample has
document id PAD_DOC. Paired (seq2seq) shards hold (samples, 2, max_source_len +
max_target_len + 1): the source, then BOS + target, padded. Every file is written under a
temporary name and renamed into place, so a crash never leaves a half-written shard under
its final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError

PAD_DOC = np.iinfo(np.uint32).max
FORMAT_VERSION = 2  # 2: samples packed per input block, shards named by block


def pack_documents(
    docs: Iterable[tuple[int, Sequence[int]]], block: int, eod: int, pad: int
) -> np.ndarray:
    """(samples, 2, block) uint32 from (document id, token ids) in order: each document is
    followed by `eod` and carries its id on every token (EOD included); a document longer
    than a block continues into the next; the last block is padded. Nothing is dropped."""
    docs = list(docs)
    lengths = np.array([len(toks) for _, toks in docs], dtype=np.int64)
    values = [np.asarray(toks, dtype=np.uint32) for _, toks in docs]
    tokens, doc_ids = join_documents(
        np.array([d for d, _ in docs], dtype=np.uint32),
        lengths,
        np.concatenate(values) if values else np.zeros(0, np.uint32),
        eod,
    )
    return samples_of(tokens, doc_ids, block, pad)


def join_documents(
    doc_ids: np.ndarray, lengths: np.ndarray, values: np.ndarray, eod: int
) -> tuple[np.ndarray, np.ndarray]:
    """Documents given as their ids, lengths and concatenated tokens, as one token stream
    with `eod` after each document, and the document id of every token (EOD included)."""
    ends = np.cumsum(lengths + 1)
    tokens = np.full(int(ends[-1]) if ends.size else 0, eod, dtype=np.uint32)
    is_token = np.ones(tokens.size, dtype=bool)
    is_token[ends - 1] = False
    tokens[is_token] = values
    return tokens, np.repeat(doc_ids.astype(np.uint32), lengths + 1)


def samples_of(tokens: np.ndarray, doc_ids: np.ndarray, block: int, pad: int) -> np.ndarray:
    """(samples, 2, block): the stream cut into samples of `block` tokens, the last one
    padded."""
    n = -(-tokens.size // block)
    tail = n * block - tokens.size
    tokens_nb = np.pad(tokens, (0, tail), constant_values=pad).reshape(n, block)
    docs_nb = np.pad(doc_ids, (0, tail), constant_values=PAD_DOC).reshape(n, block)
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


def atomic_write(path: Path, write: Any) -> None:
    """`write(f)` into a temporary file, then rename it to `path`: readers see the old file
    or the whole new one. The temporary name is unique, since processes of one machine may
    write the same file at once (the mirrors of pipeline.data.remote); it is removed if
    `write` fails."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_shard(out_dir: Path, split: str, name: str, samples: np.ndarray) -> dict[str, Any]:
    """Write one shard, `<split>/shard-<name>.npy`, atomically; its manifest entry."""
    folder = out_dir / split
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"shard-{name}.npy"
    part = np.ascontiguousarray(samples)
    atomic_write(path, lambda f: np.save(f, part, allow_pickle=False))
    return {"file": f"{split}/{path.name}", "samples": len(part), "sha256": sha256_file(path)}


def write_shards(
    out_dir: Path, split: str, samples: np.ndarray, per_shard: int
) -> list[dict[str, Any]]:
    """Write `samples` as shards of `per_shard` rows; returns their manifest entries."""
    return [
        write_shard(out_dir, split, f"{i:05d}", samples[start : start + per_shard])
        for i, start in enumerate(range(0, len(samples), per_shard))
    ]


def write_json(path: Path, obj: Any) -> None:
    data = json.dumps(obj, indent=1, sort_keys=True).encode()
    atomic_write(path, lambda f: f.write(data))


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


RANDOM_SPECIAL_IDS = {"eod": 0, "pad": 1, "bos": 2, "mask": 3}


def write_random_documents(
    folder: Path, seq_len: int, vocab: int, samples: int, seed: int = 0
) -> None:
    """A complete output of random documents, for benchmarks and tests that need shards of
    a given size and no corpus: token ids drawn uniformly, documents of 16 to 1,500 tokens
    packed with EOD between them, `samples` training samples and a sixteenth as many for
    validation (at least 4), the manifest last; no tokenizer."""
    rng = np.random.default_rng(seed)
    specials = RANDOM_SPECIAL_IDS
    splits = {}
    doc_id = 0
    for split, count in (("train", samples), ("val", max(4, samples // 16))):
        docs, tokens = [], 0
        while tokens < count * (seq_len + 1):
            n = int(rng.integers(16, 1500))
            docs.append((doc_id, rng.integers(len(specials), vocab, n).tolist()))
            doc_id, tokens = doc_id + 1, tokens + n + 1
        packed = pack_documents(docs, seq_len + 1, specials["eod"], specials["pad"])[:count]
        shards = write_shards(folder, split, packed, per_shard=64)
        splits[split] = {"documents": len(docs), "samples": len(packed), "shards": shards}
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": f"synthetic-{seed}-{seq_len}-{vocab}-{samples}",
        "paired": False,
        "seq_len": seq_len,
        "max_source_len": None,
        "max_target_len": None,
        "vocab_size": vocab,
        "special_ids": specials,
        "splits": splits,
    }
    write_json(folder / "manifest.json", manifest)
