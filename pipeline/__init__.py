"""attnpipe's orchestration package: job specs, data preprocessing, training, tracking, jobs."""

from models.build_env import use_environment_build_tools as _build_tools

__version__ = "0.1.0"

# DeepSpeed JIT-builds a small C++ op on CPU machines, and attnpipe its block-sparse kernel:
# into one cache per environment, with this environment's ninja (models/build_env.py). The
# set-up builds both once (`make setup`); every attnpipe process, Ray workers included,
# imports this package before anything builds.
_build_tools()
