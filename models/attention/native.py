"""The block-sparse kernel's CPU loop in C++ (csrc/blocksparse.cpp), built once per environment.

On a CPU the kernel runs its (batch, head) pairs on all cores at once, each core on its own
heads with its own buffers, instead of one op at a time on every core from Python: causal
BigBird at 16K tokens, fwd+bwd, 350 against 404 ms (benchmarks/results/attention.json has
every pattern). torch's extension builder compiles it with the C++ compiler that
DeepSpeed's CPU ops need too; `make setup` builds it ahead (python -m pipeline.train.ops), so
no job compiles. Where it cannot build, the kernel runs its Python loop, with the same
results, and says so once.

ATTNPIPE_NATIVE_KERNEL=0 turns it off (the Python loop everywhere).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from types import ModuleType

import torch

from models import build_env

NAME = "attnpipe_blocksparse"
SOURCE = Path(__file__).parent / "csrc" / "blocksparse.cpp"
ENABLED = os.environ.get("ATTNPIPE_NATIVE_KERNEL", "1") != "0"

log = logging.getLogger(__name__)
_lock = threading.Lock()
_built: dict[str, ModuleType | None] = {}


def extensions_dir() -> Path:
    """torch's extension cache of this environment: the one DeepSpeed's ops build into, so
    that both builds live (and are built ahead) in one place."""
    return Path(build_env.extensions_dir())


def kernel(device: torch.device | str | None = None) -> ModuleType | None:
    """The compiled module for tensors on `device` (CPU only), or None: disabled, another
    device, or no build possible here."""
    if not ENABLED or torch.device(device or "cpu").type != "cpu":
        return None
    with _lock:
        if NAME not in _built:
            _built[NAME] = _build()
        return _built[NAME]


def _build() -> ModuleType | None:
    try:
        from torch.utils.cpp_extension import load

        build_env.use_environment_build_tools()  # as `make setup` built it, also without pipeline
        build = extensions_dir() / NAME
        build.mkdir(parents=True, exist_ok=True)
        return load(
            NAME,
            [str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp"],
            build_directory=str(build),
            verbose=False,
        )
    except Exception as exc:  # no compiler, no headers: the Python loop computes the same
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("the native block-sparse CPU kernel did not build (%s): Python loop", reason)
        return None
