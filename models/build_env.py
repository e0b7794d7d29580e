"""Where torch builds attnpipe's C++ extensions (DeepSpeed's CPU communication op and the
block-sparse kernel): one cache per environment, built by this environment's own ninja.
No torch here: `pipeline` applies it at import, before anything builds."""

from __future__ import annotations

import os
import sys


def extensions_dir() -> str:
    """torch's extension cache of this environment (not one per user: two environments
    would rebuild in turn, and a process killed mid-build leaves a lock that makes every
    later start wait forever). `make setup` builds into it ahead of any job."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(sys.prefix, "torch_extensions")


def use_environment_build_tools() -> None:
    """Set TORCH_EXTENSIONS_DIR (Ray workers inherit it), and put this environment's bin
    folder first on PATH when it holds a `ninja`. torch builds with the ninja on PATH, and
    ninja's build log hashes each command with a function its versions do not share: a
    machine's own ninja (1.11 here) and this environment's (1.13, a dependency of
    DeepSpeed) each took the other's build for stale and rebuilt it, 35-55 s on every core,
    in the first job after `make setup` and on every switch between a shell and a Ray job
    (whose PATH leads with the environment)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())
    bin_dir = os.path.dirname(sys.executable)
    if not os.path.isfile(os.path.join(bin_dir, "ninja")):
        return
    path = os.environ.get("PATH", "").split(os.pathsep)
    if path[:1] != [bin_dir]:
        os.environ["PATH"] = os.pathsep.join([bin_dir, *(p for p in path if p != bin_dir)])
