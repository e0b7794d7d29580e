"""Preprocessed data in object storage (s3://, gs://), through pyarrow's filesystems.

A preprocessed output has the same layout under a URI as in a folder: `manifest.json`,
`tokenizer.json`, `train/` and `val/` shards. Preprocessing writes it in a local mirror
folder first (staged, as for a local output), then uploads: the old manifest is deleted
first, the shards and the tokenizer go up, stale shards of an earlier run are deleted, and
the manifest goes up last, so a reader never takes a mix of two runs for a complete output.
Training memory-maps shards, so every node that reads a URI keeps a local mirror of it
(`$ATTNPIPE_CACHE`, default `~/.cache/attnpipe`) and downloads only the files whose
checksum differs from the manifest's.

Credentials and the endpoint come from the environment, as the providers' own tools read
them (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, `GOOGLE_APPLICATION_CREDENTIALS`, and
`STORAGE_EMULATOR_HOST` for a GCS emulator), never from the URI, which is logged.
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pipeline.data.shards import atomic_write, read_manifest, sha256_file, write_json
from pipeline.errors import DataError

SCHEMES = ("s3", "gs", "gcs")
SECRET_PARAMS = ("access_key", "secret_key", "session_token", "credentials")
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
CHUNK = 8 << 20


def is_uri(path: str | Path) -> bool:
    """True for `scheme://...` locations other than plain files."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def check_uri(uri: str) -> str:
    """The reason `uri` cannot hold preprocessed data, or '' when it can."""
    parts = urlsplit(uri)
    if parts.scheme not in SCHEMES:
        return f"scheme {parts.scheme!r} is not supported; use s3:// or gs:// (or a folder)"
    if not parts.netloc:
        return "names no bucket"
    if "@" in parts.netloc or any(p in parse_qs(parts.query) for p in SECRET_PARAMS):
        return "holds credentials; give them in the environment, never in the URI (it is logged)"
    if ".." in parts.path.split("/"):
        return "has a '..' component"  # its mirror folder would lie outside the cache
    return ""


def join(uri: str, *names: str) -> str:
    """`uri` with path components appended, its query (endpoint options) kept at the end."""
    parts = urlsplit(uri)
    path = "/".join([parts.path.rstrip("/"), *names])
    return parts._replace(path=path).geturl()


def _fail(uri: str, what: str, exc: BaseException) -> DataError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return DataError(f"{uri}: cannot {what}: {first}")


def _filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path of the URI's folder inside it)."""
    import pyarrow.fs as pafs

    reason = check_uri(uri)
    if reason:
        raise DataError(f"{uri}: {reason}")
    parts = urlsplit(uri)
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    try:
        if parts.scheme in ("gs", "gcs") and emulator:  # Google's convention for emulators
            host = urlsplit(emulator if "://" in emulator else f"http://{emulator}")
            fs = pafs.GcsFileSystem(
                anonymous=True,
                scheme=host.scheme,
                endpoint_override=host.netloc,
                retry_time_limit=timedelta(seconds=10),
            )
            return fs, f"{parts.netloc}{parts.path}".rstrip("/")
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # pyarrow raises ValueError, OSError, ArrowInvalid...
        raise _fail(uri, "open the storage", exc) from None
    return fs, path.rstrip("/")


def mirror_dir(uri: str) -> Path:
    """The local folder that mirrors `uri` on this machine."""
    parts = urlsplit(uri)
    root = Path(os.environ.get("ATTNPIPE_CACHE") or Path.home() / ".cache" / "attnpipe")
    return (root / "remote" / parts.scheme / parts.netloc / parts.path.strip("/")).absolute()


def read_remote_manifest(uri: str) -> dict[str, Any] | None:
    """The manifest at `uri`, or None when there is none (no complete output there)."""
    import pyarrow.fs as pafs

    fs, root = _filesystem(uri)
    path = f"{root}/{MANIFEST}"
    try:
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as f:
            raw = f.read()
    except Exception as exc:
        raise _fail(uri, "read the manifest", exc) from None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{join(uri, MANIFEST)}: corrupt manifest") from None


def upload(local: Path, uri: str, manifest: dict[str, Any]) -> None:
    """Put the complete output in `local` at `uri`; the manifest first removed, then
    written last."""
    import pyarrow.fs as pafs

    fs, root = _filesystem(uri)
    files = [TOKENIZER] + [e["file"] for s in manifest["splits"].values() for e in s["shards"]]
    try:
        if fs.get_file_info(f"{root}/{MANIFEST}").type == pafs.FileType.File:
            fs.delete_file(f"{root}/{MANIFEST}")
        for name in files:
            _put(fs, local / name, f"{root}/{name}")
        keep = {f"{root}/{name}" for name in files}
        for split in ("train", "val"):
            listing = fs.get_file_info(pafs.FileSelector(f"{root}/{split}", allow_not_found=True))
            for info in listing:
                if info.type == pafs.FileType.File and info.path not in keep:
                    fs.delete_file(info.path)  # a shard of an earlier, larger run
        _put(fs, local / MANIFEST, f"{root}/{MANIFEST}")
    except DataError:
        raise
    except Exception as exc:
        raise _fail(uri, "upload", exc) from None


def _put(fs: Any, source: Path, path: str) -> None:
    with source.open("rb") as src, fs.open_output_stream(path) as dst:
        for chunk in iter(lambda: src.read(CHUNK), b""):
            dst.write(chunk)


def local_copy(data_dir: str | Path) -> Path:
    """A local folder holding the preprocessed output at `data_dir`: the folder itself, or
    for a URI this machine's mirror of it, brought up to date with the remote manifest."""
    if not is_uri(data_dir):
        return Path(data_dir)
    uri = str(data_dir)
    manifest = read_remote_manifest(uri)
    if manifest is None:
        raise DataError(f"{join(uri, MANIFEST)}: no manifest: no complete preprocessed output")
    mirror = mirror_dir(uri)
    if _mirrored(mirror, manifest):
        return mirror  # shards are checked against their checksums when opened
    mirror.mkdir(parents=True, exist_ok=True)
    with (mirror / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per machine; other ranks wait for it
        if not _mirrored(mirror, manifest):
            _download(uri, mirror, manifest)
    return mirror


def _mirrored(mirror: Path, manifest: dict[str, Any]) -> bool:
    try:
        return read_manifest(mirror) == manifest
    except DataError:
        return False


def _download(uri: str, mirror: Path, manifest: dict[str, Any]) -> None:
    fs, root = _filesystem(uri)
    entries = [e for s in manifest["splits"].values() for e in s["shards"]]
    (mirror / MANIFEST).unlink(missing_ok=True)  # incomplete until the new one is written
    try:
        _get(fs, f"{root}/{TOKENIZER}", mirror / TOKENIZER)
        for entry in entries:
            target = mirror / entry["file"]
            if target.is_file() and sha256_file(target) == entry["sha256"]:
                continue
            _get(fs, f"{root}/{entry['file']}", target)
            if sha256_file(target) != entry["sha256"]:
                target.unlink()
                raise DataError(
                    f"{join(uri, entry['file'])}: shard is corrupt or truncated (checksum mismatch)"
                )
    except DataError:
        raise
    except Exception as exc:
        raise _fail(uri, "download", exc) from None
    listed = {mirror / e["file"] for e in entries}
    for split in ("train", "val"):
        for stale in (mirror / split).glob("*.npy"):
            if stale not in listed:
                stale.unlink(missing_ok=True)
    write_json(mirror / MANIFEST, manifest)


def local_file(data_dir: str | Path, name: str) -> Path:
    """One file of the output at `data_dir` on this machine (for a URI, fetched into the
    mirror when it is not there yet)."""
    if not is_uri(data_dir):
        return Path(data_dir) / name
    target = mirror_dir(str(data_dir)) / name
    if not target.is_file():
        fs, root = _filesystem(str(data_dir))
        try:
            _get(fs, f"{root}/{name}", target)
        except Exception as exc:
            raise _fail(str(data_dir), f"download {name}", exc) from None
    return target


def fetch_files(pattern: str) -> list[tuple[str, Path]]:
    """(URI, local copy) of every object a URI or glob (`*`, `?`, `**`) names, in URI
    order; an object is downloaded again only when its size or time changed."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(pattern)
    scheme = urlsplit(pattern).scheme
    parts = path.split("/")
    fixed = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))
    try:
        if fixed == len(parts):  # no glob: one object
            infos = [fs.get_file_info(path)]
        else:
            base = "/".join(parts[:fixed])
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            infos = [i for i in infos if fnmatch.fnmatchcase(i.path, path)]
    except Exception as exc:
        raise _fail(pattern, "list", exc) from None
    out = []
    for info in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        uri = f"{scheme}://{info.path}"
        local = mirror_dir(uri)
        stamp = (info.size, info.mtime_ns)
        if not local.is_file() or (local.stat().st_size, local.stat().st_mtime_ns) != stamp:
            try:
                _get(fs, info.path, local)
            except Exception as exc:
                raise _fail(uri, "download", exc) from None
            if info.mtime_ns is not None:
                os.utime(local, ns=(info.mtime_ns, info.mtime_ns))
        out.append((uri, local))
    return out


def _get(fs: Any, path: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with fs.open_input_stream(path) as src:
        atomic_write(target, lambda dst: shutil.copyfileobj(src, dst, CHUNK))
