"""attnpipe's orchestration package: job specs, data preprocessing, training, tracking, jobs."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# DeepSpeed JIT-builds a small C++ op on CPU machines into torch's extension cache. One
# cache per environment (not one per user): two environments would rebuild it in turn, and
# a process killed mid-build leaves a lock that makes every later start wait forever. The
# set-up builds it once (`make setup`); Ray workers inherit this variable from the driver.
_os.environ.setdefault("TORCH_EXTENSIONS_DIR", _os.path.join(_sys.prefix, "torch_extensions"))

# torch builds those extensions with the `ninja` on PATH, and ninja's build log hashes each
# command with a function its versions do not share: a machine's own ninja (1.11) and this
# environment's (1.13, a dependency of DeepSpeed) each took the other's build for stale and
# rebuilt it, 35-55 s on every core, in the first job after `make setup` and on every switch
# between a shell and a Ray job (whose PATH leads with the environment). This environment's
# ninja comes first in every attnpipe process, so the ahead-of-time build is the one used.
_bin = _os.path.dirname(_sys.executable)
if _os.path.isfile(_os.path.join(_bin, "ninja")):
    _path = _os.environ.get("PATH", "").split(_os.pathsep)
    if _path[:1] != [_bin]:
        _os.environ["PATH"] = _os.pathsep.join([_bin, *(p for p in _path if p != _bin)])
