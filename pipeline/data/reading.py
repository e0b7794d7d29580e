"""Input blocks a worker reads itself: the driver lists a `files` source's files and cuts
them into blocks from their sizes and metadata alone (never their text, never the CPU
count), and each pass-1 task reads its own block. The text never passes through the
driver.

- JSON lines (`.jsonl`, and `.json` holding one object a line): byte ranges of BLOCK
  bytes; a range holds the lines that start in it.
- Parquet: consecutive row groups, until their uncompressed size reaches BLOCK bytes.
- Text: whole files (one document each), consecutive ones until their size reaches BLOCK.

CSV (a quoted field may hold a newline) and a `.json` file holding one array are read on
the driver through Hugging Face `datasets`, as are the demo corpus, hub datasets, and files
in a bucket (which the driver fetches into its local mirror). On a cluster, local files
must be on a mount every node sees.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import SourceNode
from pipeline.errors import DataError

FORMATS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class FileBlock:
    """One block of a `files` source: `format` (json, parquet or text), its file(s), the
    byte range (json) or row groups (parquet) [start, stop) of `paths[0]`, and which
    column of the file becomes `text` (and `target`)."""

    format: str
    paths: tuple[str, ...]
    start: int
    stop: int
    columns: tuple[tuple[str, str], ...]


def file_format(source: SourceNode, found: list[tuple[str, Path]]) -> str:
    fmt = source.format or FORMATS.get(Path(found[0][0]).suffix.lower())
    if fmt is None:
        raise DataError(f"{found[0][0]}: unknown format; set data.sources[].format")
    return "json" if fmt == "jsonl" else fmt


def plan_blocks(
    source: SourceNode, found: list[tuple[str, Path]], paired: bool, limit: int
) -> list[FileBlock] | None:
    """The blocks workers read of a `files` source whose files are `found` (name, local
    path), or None where the driver reads it (csv, a JSON array). Checks the columns the
    way the driver's reader does: one line naming the source and the columns it has."""
    from pipeline.data.remote import is_uri

    fmt = file_format(source, found)
    paths = [str(local) for _, local in found]
    if is_uri(found[0][0]) or fmt == "csv" or (fmt == "json" and _json_array(paths[0])):
        return None  # a bucket's objects are in this machine's mirror
    wanted = {source.text_column: "text"}
    if paired:
        if source.target_column is None:
            raise DataError(f"{source.path}: paired data needs data.sources[].target_column")
        wanted[source.target_column] = "target"
    have = _columns(fmt, paths[0])
    for column in wanted:
        if have is not None and column not in have:
            raise DataError(f"{source.path}: no column {column!r}; columns are: {', '.join(have)}")
    columns = tuple(wanted.items())
    if fmt == "text":
        return [
            FileBlock("text", tuple(group), 0, 0, columns)
            for group in _greedy(paths, [Path(p).stat().st_size for p in paths], limit)
        ]
    out = []
    for path in paths:
        if fmt == "json":
            size = Path(path).stat().st_size
            out += [
                FileBlock("json", (path,), a, min(a + limit, size), columns)
                for a in range(0, size, limit)
            ]
        else:
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path).metadata
            sizes = [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]
            start = 0
            for group in _greedy(list(range(len(sizes))), sizes, limit):
                out.append(FileBlock("parquet", (path,), start, start + len(group), columns))
                start += len(group)
    return out


def _greedy(items: list[Any], sizes: list[int], limit: int) -> list[list[Any]]:
    """Consecutive items, a group closing at the item whose size brings it to `limit`."""
    groups: list[list[Any]] = [[]]
    total = 0
    for item, size in zip(items, sizes, strict=True):
        groups[-1].append(item)
        total += size
        if total >= limit:
            groups.append([])
            total = 0
    return [g for g in groups if g]


def _json_array(path: str) -> bool:
    """Whether a .json file holds one JSON array rather than an object a line."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def _columns(fmt: str, path: str) -> list[str] | None:
    """The columns of a source, from its first file: the keys of its first JSON line, the
    parquet schema, or `text` for text files (None: no line to tell)."""
    if fmt == "text":
        return ["text"]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                row = _json_line(line, path, number)
                return list(row)
    return None


def _json_line(line: bytes, path: str, where: int | str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: cannot read as json: line {where}: {exc}") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}: cannot read as json: line {where} is not an object")
    return row


def read_text(path: str) -> tuple[str, int]:
    """A text file as one document, invalid UTF-8 replaced (U+FFFD); the replacements."""
    raw = Path(path).read_bytes()
    text = codecs.getincrementaldecoder("utf-8")("replace").decode(raw, final=True)
    return text, text.count("\ufffd") - raw.decode("utf-8", "ignore").count("\ufffd")


def read_block(block: FileBlock) -> tuple[Any, int]:
    """(table with `text`, and `target`; characters of invalid UTF-8 replaced, for text)."""
    try:
        return _read(block)
    except FileNotFoundError as exc:
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "-"
        raise DataError(
            f"{exc.filename}: no such file on Ray node {node}: on a cluster, a files "
            "source must be on a mount every node sees"
        ) from None


def _read(block: FileBlock) -> tuple[Any, int]:
    import pyarrow as pa

    rows: dict[str, list[Any]] = {name: [] for _, name in block.columns}
    replaced = 0
    if block.format == "text":
        for path in block.paths:
            text, bad = read_text(path)
            replaced += bad
            rows["text"].append(text)
    elif block.format == "parquet":
        import pyarrow.parquet as pq

        names = [column for column, _ in block.columns]
        table = pq.ParquetFile(block.paths[0]).read_row_groups(
            list(range(block.start, block.stop)), columns=names
        )
        return table.rename_columns([name for _, name in block.columns]), 0
    else:
        path = block.paths[0]
        with open(path, "rb") as f:
            f.seek(max(block.start - 1, 0))
            if block.start > 0:
                f.readline()  # the line that started before this range is the last block's
            while f.tell() < block.stop:
                at = f.tell()
                line = f.readline()
                if not line:
                    break
                if line.strip():
                    row = _json_line(line, path, f"at byte {at}")
                    for column, name in block.columns:
                        value = row.get(column)
                        rows[name].append(value if value is None else str(value))
    return pa.table(
        {name: pa.array(values, pa.string()) for name, values in rows.items()}
    ), replaced
