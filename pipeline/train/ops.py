"""What a CPU training run needs prepared: ahead-of-time builds of the DeepSpeed ops and of
attnpipe's native attention kernel, so that no training job ever compiles (and no job killed
while compiling leaves a stale build lock behind), and the environment its worker processes
start with."""

from __future__ import annotations

import os

# CPU training workers: glibc hands every freed block above its mmap threshold (which grows
# to at most 32 MiB) back to the kernel, so a step that allocates and frees the same large
# gradient and optimizer buffers (DeepSpeed's flat ZeRO partitions: hundreds of MB per step)
# faults all their pages in again, every step. With these, freed memory stays in the heap
# for the next step, as the CUDA caching allocator keeps it on a GPU.
CPU_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}


def init_loopback_group(rank: int, world: int, port: int) -> None:
    """A gloo process group of `world` processes on this machine, with the environment
    DeepSpeed reads, outside Ray Train (benchmarks, tests)."""
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)


def prebuild() -> list[str]:
    """Build what CPU training loads at start: the shared-memory communication op of
    DeepSpeed's CPU backend and attnpipe's native block-sparse attention kernel; nothing to do
    where a GPU accelerator is in use. Returns what was built."""
    from deepspeed.accelerator import get_accelerator

    import pipeline  # noqa: F401 - sets TORCH_EXTENSIONS_DIR for this environment
    from models.attention import native

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return []
    built = []
    builder = accelerator.create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load(verbose=False)
        built.append(f"{builder.absolute_name()} in {os.environ['TORCH_EXTENSIONS_DIR']}")
    if native.kernel() is None:
        raise SystemExit("the native block-sparse kernel did not build: is a C++ compiler here?")
    built.append(f"{native.NAME} in {native.extensions_dir()}")
    return built


if __name__ == "__main__":
    for built in prebuild():
        print(f"built {built}")
