"""Preprocessed data in object storage (s3://, gs://), through pyarrow's filesystems.

A preprocessed output has the same layout under a URI as in a folder: `manifest.json`,
`tokenizer.json`, `train/` and `val/` shards. Preprocessing's workers upload the shards
they write under the URI's staging prefix (`.staging/`); when all are there the driver
publishes them (`publish`): the old manifest is deleted first, the staged objects are
copied into place within the storage, stale shards of an earlier run are deleted, and the
manifest goes up last, so a reader never takes a mix of two runs for a complete output.
Workers read a bucket's source files themselves, by ranges (`open_input`).
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


def failure(uri: str, what: str, exc: BaseException) -> DataError:
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
        raise failure(uri, "open the storage", exc) from None
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
        raise failure(uri, "read the manifest", exc) from None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{join(uri, MANIFEST)}: corrupt manifest") from None


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
        raise failure(uri, "download", exc) from None
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
            raise failure(str(data_dir), f"download {name}", exc) from None
    return target


def list_files(pattern: str) -> list[tuple[str, int, int | None]]:
    """(URI, size, modification time in ns) of every object a URI or glob (`*`, `?`,
    `**`) names, in URI order: a listing, nothing read."""
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
        raise failure(pattern, "list", exc) from None
    files = sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)
    return [(f"{scheme}://{i.path}", i.size, i.mtime_ns) for i in files]


def fetch(uri: str, size: int, mtime_ns: int | None) -> Path:
    """This machine's copy of the object at `uri` (as `list_files` gave it), downloaded
    again only when its size or time changed."""
    local = mirror_dir(uri)
    if not local.is_file() or (local.stat().st_size, local.stat().st_mtime_ns) != (size, mtime_ns):
        fs, path = _filesystem(uri)
        try:
            _get(fs, path, local)
        except Exception as exc:
            raise failure(uri, "download", exc) from None
        if mtime_ns is not None:
            os.utime(local, ns=(mtime_ns, mtime_ns))
    return local


def open_input(location: str) -> Any:
    """A local path or a URI opened for reading at any offset (`seek`, `read`)."""
    if not is_uri(location):
        return open(location, "rb")
    fs, path = _filesystem(location)
    try:
        return fs.open_input_file(path)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise failure(location, "read", exc) from None


def put_file(local: Path, uri: str) -> None:
    """Upload one file to `uri` (an object appears whole or not at all)."""
    fs, path = _filesystem(uri)
    try:
        _put(fs, local, path)
    except Exception as exc:
        raise failure(uri, "upload", exc) from None


def clear(uri: str) -> None:
    """Delete every object under `uri` (a prefix)."""
    fs, root = _filesystem(uri)
    try:
        fs.delete_dir_contents(root, missing_dir_ok=True)
    except Exception as exc:
        raise failure(uri, "delete", exc) from None


def staged_files(uri: str) -> set[str]:
    """The paths, relative to `uri`, of the objects under it."""
    import pyarrow.fs as pafs

    fs, root = _filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except Exception as exc:
        raise failure(uri, "list", exc) from None
    return {i.path.removeprefix(f"{root}/") for i in infos if i.type == pafs.FileType.File}


def publish(staged: str, uri: str, manifest: dict[str, Any], manifest_file: Path) -> None:
    """Move a finished run's objects from the staging prefix `staged` into place at `uri`,
    copied within the storage (no byte passes through this machine): the old manifest
    deleted first, stale shards of an earlier run deleted, the staging prefix emptied, and
    the manifest (`manifest_file`) written last."""
    import pyarrow.fs as pafs

    fs, root = _filesystem(uri)
    _, staging = _filesystem(staged)
    files = [TOKENIZER] + [e["file"] for s in manifest["splits"].values() for e in s["shards"]]
    try:
        if fs.get_file_info(f"{root}/{MANIFEST}").type == pafs.FileType.File:
            fs.delete_file(f"{root}/{MANIFEST}")
        for name in files:
            fs.copy_file(f"{staging}/{name}", f"{root}/{name}")
        keep = {f"{root}/{name}" for name in files}
        for split in ("train", "val"):
            listing = fs.get_file_info(pafs.FileSelector(f"{root}/{split}", allow_not_found=True))
            for info in listing:
                if info.type == pafs.FileType.File and info.path not in keep:
                    fs.delete_file(info.path)  # a shard of an earlier, larger run
        fs.delete_dir_contents(staging, missing_dir_ok=True)
        _put(fs, manifest_file, f"{root}/{MANIFEST}")
    except Exception as exc:
        raise failure(uri, "publish", exc) from None


def _get(fs: Any, path: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with fs.open_input_stream(path) as src:
        atomic_write(target, lambda dst: shutil.copyfileobj(src, dst, CHUNK))
