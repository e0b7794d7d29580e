"""Per-document text stages, as small functions on batches: normalize, filter, hash, split.

Each takes and returns a batch, a dict of column name to list or array, which is what Ray
Data's `map_batches` hands a task; nothing here knows about Ray.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any

import numpy as np

Batch = dict[str, Any]

# C0 and C1 control characters other than tab and newline, plus DEL
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_BLANK_LINES = re.compile(r"\n\s*\n\s*\n+")
FILTER_REASONS = ("empty", "too_short", "too_long")


def normalize_text(text: str) -> str:
    """Unicode NFC, control characters removed, runs of spaces collapsed, at most one blank
    line between paragraphs, no leading or trailing whitespace."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


def normalize(batch: Batch) -> Batch:
    """Normalize the `text` column (and `target`, for paired data)."""
    out = dict(batch)
    for column in ("text", "target"):
        if column in batch:
            out[column] = np.array([normalize_text(str(t)) for t in batch[column]], dtype=object)
    return out


def filter_reason(text: str, min_chars: int, max_chars: int | None) -> str:
    """Why a document is dropped, or "" to keep it."""
    if not text:
        return "empty"
    if len(text) < min_chars:
        return "too_short"
    if max_chars is not None and len(text) > max_chars:
        return "too_long"
    return ""


def tag_filter(batch: Batch, min_chars: int, max_chars: int | None) -> Batch:
    """Add a `drop` column naming the reason a document goes (empty string: it stays)."""
    reasons = []
    for i, text in enumerate(batch["text"]):
        reason = filter_reason(text, min_chars, max_chars)
        if not reason and "target" in batch and not batch["target"][i]:
            reason = "empty"
        reasons.append(reason)
    return {**batch, "drop": np.array(reasons, dtype=object)}


def content_hash(text: str, target: str | None = None) -> str:
    """The document's identity for deduplication and the split: sha256 of its text."""
    h = hashlib.sha256(text.encode("utf-8"))
    if target is not None:
        h.update(b"\x00")
        h.update(target.encode("utf-8"))
    return h.hexdigest()


def add_hash(batch: Batch) -> Batch:
    targets = batch.get("target")
    hashes = [
        content_hash(t, None if targets is None else targets[i])
        for i, t in enumerate(batch["text"])
    ]
    return {**batch, "hash": np.array(hashes, dtype=object)}


def hash_below(digest: str, fraction: float, salt: int = 0) -> bool:
    """A deterministic coin with P(True) = fraction, read from hex digits of the content
    hash; different salts read different digits, so the coins are independent."""
    return int(digest[12 * salt : 12 * salt + 12], 16) / float(1 << 48) < fraction


def clean(batch: Batch, min_chars: int, max_chars: int | None) -> Batch:
    """normalize, tag_filter and add_hash in one pass over a batch."""
    return add_hash(tag_filter(normalize(batch), min_chars, max_chars))


def is_validation(digest: str, val_fraction: float) -> bool:
    """A document's split from its content hash alone: stable when the corpus grows."""
    return hash_below(digest, val_fraction, salt=0)
