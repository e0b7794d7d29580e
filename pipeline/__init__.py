"""attnpipe's orchestration package: job specs, data preprocessing, training, tracking, jobs."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# DeepSpeed JIT-builds a small C++ op on CPU machines into torch's extension cache. One
# cache per environment (not one per user): two environments would rebuild it in turn, and
# a process killed mid-build leaves a lock that makes every later start wait forever. The
# set-up builds it once (`make setup`); Ray workers inherit this variable from the driver.
_os.environ.setdefault("TORCH_EXTENSIONS_DIR", _os.path.join(_sys.prefix, "torch_extensions"))
