"""Ahead-of-time builds of the DeepSpeed ops a CPU run needs, so that no training job ever
compiles (and no job killed while compiling leaves a stale build lock behind)."""

from __future__ import annotations

import os


def prebuild() -> list[str]:
    """Build the shared-memory communication op DeepSpeed's CPU backend loads at start;
    nothing to do where a GPU accelerator is in use. Returns what was built."""
    from deepspeed.accelerator import get_accelerator

    import pipeline  # noqa: F401 - sets TORCH_EXTENSIONS_DIR for this environment

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return []
    builder = accelerator.create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return []
    builder.load(verbose=False)
    return [f"{builder.absolute_name()} in {os.environ['TORCH_EXTENSIONS_DIR']}"]


if __name__ == "__main__":
    for built in prebuild():
        print(f"built {built}")
