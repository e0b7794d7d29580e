"""Real object-storage servers for tests, each a process on a free loopback port with a
bucket made, and the environment that points clients at it, as the providers' tools read
it: moto's S3-compatible server, and an emulator of Google Cloud Storage. Both stopped by
their process id."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.runtime import free_port


@contextmanager
def _server(cmd: list[str], port: int) -> Iterator[None]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{cmd[0]}: the test server did not start") from None
                time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def s3_server(bucket: str) -> Iterator[dict[str, str]]:
    """Yields the environment variables an S3 client needs; the server is gone afterwards."""
    import pyarrow.fs as pafs

    port = free_port()
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with _server(cmd, port):
        env = {
            "AWS_ACCESS_KEY_ID": "attnpipe-test",
            "AWS_SECRET_ACCESS_KEY": "attnpipe-test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }
        pafs.S3FileSystem(
            access_key=env["AWS_ACCESS_KEY_ID"],
            secret_key=env["AWS_SECRET_ACCESS_KEY"],
            region=env["AWS_DEFAULT_REGION"],
            endpoint_override=f"127.0.0.1:{port}",
            scheme="http",
            allow_bucket_creation=True,
        ).create_dir(bucket)
        yield env


@contextmanager
def gcs_server(bucket: str) -> Iterator[dict[str, str]]:
    """Yields `STORAGE_EMULATOR_HOST`, Google's variable for an emulator's address."""
    port = free_port()
    exe = str(Path(sys.executable).parent / "gcp-storage-emulator")
    cmd = [exe, "start", "--host=127.0.0.1", f"--port={port}", "--in-memory"]
    with _server([*cmd, f"--default-bucket={bucket}"], port):
        yield {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}"}
