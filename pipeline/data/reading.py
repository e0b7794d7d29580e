"""Input blocks a worker reads itself: the driver lists a `files` source's files and cuts
them into blocks from their sizes and metadata alone (never their text, never the CPU
count), and each pass-1 task reads its own block. The text never passes through the
driver.

- JSON lines (`.jsonl`, and `.json` holding one object a line): byte ranges of BLOCK
  bytes; a range holds the lines that start in it.
- Parquet: consecutive row groups, until their uncompressed size reaches BLOCK bytes.
- Text: whole files (one document each), consecutive ones until their size reaches BLOCK.

Files in a bucket (s3://, gs://) are cut the same way, from the bucket's listing (and a
parquet file's footer), and each task reads its byte range or row groups from the bucket
itself. CSV (a quoted field may hold a newline) and a `.json` file holding one array are
read on the driver through Hugging Face `datasets` (from the driver's local mirror, for a
bucket), as are the demo corpus and hub datasets. On a cluster, local files must be on a
mount every node sees, and every node needs the bucket's credentials in its environment.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.config import SourceNode
from pipeline.data.remote import failure, is_uri, open_input
from pipeline.errors import DataError

FORMATS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class SourceFile(NamedTuple):
    """One file of a `files` source: its name (a local path, or a URI that workers read
    the object at), its size, and a bucket object's modification time (None for a local
    file, which is known by its content)."""

    name: str
    size: int
    mtime_ns: int | None = None


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


def file_format(source: SourceNode, found: list[SourceFile]) -> str:
    fmt = source.format or FORMATS.get(Path(found[0].name).suffix.lower())
    if fmt is None:
        raise DataError(f"{found[0].name}: unknown format; set data.sources[].format")
    return "json" if fmt == "jsonl" else fmt


def plan_blocks(
    source: SourceNode, found: list[SourceFile], paired: bool, limit: int
) -> list[FileBlock] | None:
    """The blocks workers read of a `files` source whose files are `found`, or None where
    the driver reads it (csv, a JSON array). Checks the columns the way the driver's
    reader does: one line naming the source and the columns it has."""
    fmt = file_format(source, found)
    paths = [f.name for f in found]
    if fmt == "csv" or (fmt == "json" and _json_array(paths[0])):
        return None
    wanted = wanted_columns(source, paired, _columns(fmt, paths[0]), str(source.path))
    columns = tuple(wanted.items())
    if fmt == "text":
        return [
            FileBlock("text", tuple(group), 0, 0, columns)
            for group in _greedy(paths, [f.size for f in found], limit)
        ]
    out = []
    for path, size, _ in found:
        if fmt == "json":
            out += [
                FileBlock("json", (path,), a, min(a + limit, size), columns)
                for a in range(0, size, limit)
            ]
        else:
            import pyarrow.parquet as pq

            with open_input(path) as f:
                meta = pq.ParquetFile(f).metadata
            sizes = [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]
            start = 0
            for group in _greedy(list(range(len(sizes))), sizes, limit):
                out.append(FileBlock("parquet", (path,), start, start + len(group), columns))
                start += len(group)
    return out


def wanted_columns(
    source: SourceNode, paired: bool, have: list[str] | None, where: str
) -> dict[str, str]:
    """{source column: `text` (and `target`)} of a source whose columns are `have` (None:
    not known), checked: one line naming `where` and the columns it has."""
    wanted = {source.text_column: "text"}
    if paired:
        if source.target_column is None:
            raise DataError(f"{where}: paired data needs data.sources[].target_column")
        wanted[source.target_column] = "target"
    for column in wanted:
        if have is not None and column not in have:
            raise DataError(f"{where}: no column {column!r}; columns are: {', '.join(have)}")
    return wanted


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
    with open_input(path) as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def _columns(fmt: str, path: str) -> list[str] | None:
    """The columns of a source, from its first file: the keys of its first JSON line, the
    parquet schema, or `text` for text files (None: no line to tell)."""
    if fmt == "text":
        return ["text"]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with open_input(path) as f:
            return list(pq.ParquetFile(f).schema_arrow.names)
    with open_input(path) as f:
        for at, line in _lines(f, 0, None):
            if line.strip():
                return list(_json_line(line, path, f"at byte {at}"))
    return None


def _lines(f: Any, start: int, stop: int | None, chunk: int = 1 << 18) -> Any:
    """(offset, line) of each line of `f` that starts in [start, stop) (stop None: to the
    end), the last one read on past `stop` to its end. Ranged reads only, so a bucket
    object is read like a local file."""
    at = max(start - 1, 0)  # the file offset of buffer[0]
    f.seek(at)
    buffer = f.read(chunk if stop is None else max(stop - at, 1))
    pos = 0  # where the next line starts in buffer
    skip = start > 0  # the line holding byte start-1 is the block before's
    while True:
        cut = buffer.find(b"\n", pos)
        if cut < 0:
            more = f.read(chunk)
            if more:  # a line goes on past what was read
                buffer, at, pos = buffer[pos:] + more, at + pos, 0
                continue
            cut = len(buffer) - 1  # the last line, with no newline
            if pos > cut:
                return
        line, offset, pos = buffer[pos : cut + 1], at + pos, cut + 1
        if skip:
            skip = False
        elif stop is not None and offset >= stop:
            return
        else:
            yield offset, line


def _json_line(line: bytes, path: str, where: int | str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: cannot read as json: line {where}: {exc}") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}: cannot read as json: line {where} is not an object")
    return row


def read_text(path: str) -> tuple[str, int]:
    """A text file (a local path or a URI) as one document, invalid UTF-8 replaced
    (U+FFFD); the replacements."""
    with open_input(path) as f:
        raw = f.read()
    text = codecs.getincrementaldecoder("utf-8")("replace").decode(raw, final=True)
    return text, text.count("\ufffd") - raw.decode("utf-8", "ignore").count("\ufffd")


def read_block(block: FileBlock) -> tuple[Any, int]:
    """(table with `text`, and `target`; characters of invalid UTF-8 replaced, for text)."""
    try:
        return _read(block)
    except FileNotFoundError as exc:
        import ray

        if is_uri(block.paths[0]):
            raise DataError(f"{block.paths[0]}: the object is gone since it was listed") from None
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "-"
        raise DataError(
            f"{exc.filename}: no such file on Ray node {node}: on a cluster, a files "
            "source must be on a mount every node sees"
        ) from None
    except OSError as exc:  # a bucket's connection lost while reading
        if not is_uri(block.paths[0]):
            raise
        raise failure(block.paths[0], "read", exc) from None


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
        with open_input(block.paths[0]) as f:
            table = pq.ParquetFile(f).read_row_groups(
                list(range(block.start, block.stop)), columns=names
            )
        return table.rename_columns([name for _, name in block.columns]), 0
    else:
        path = block.paths[0]
        with open_input(path) as f:
            for at, line in _lines(f, block.start, block.stop):
                if line.strip():
                    row = _json_line(line, path, f"at byte {at}")
                    for column, name in block.columns:
                        value = row.get(column)
                        rows[name].append(value if value is None else str(value))
    return pa.table(
        {name: pa.array(values, pa.string()) for name, values in rows.items()}
    ), replaced
