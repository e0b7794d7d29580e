"""One copy of the weights under ZeRO when training in fp32.

DeepSpeed's ZeRO optimizers update a "master" fp32 copy of this rank's partition of the
weights and copy the result back into the model's own (flattened, partitioned) parameter
buffer. With fp32 parameters the two hold the same numbers, so the copy is pure cost: a
third of the optimizer memory of ZeRO-1/2/3 at world size 2, and a copy of the partition
every step. ZeRO-3 means to skip it ("we don't need another copy of the weights", in
`_create_fp32_partitions`), but compares a torch.device with the accelerator's device
name, a string, which is never equal; ZeRO-1/2 always clone.

`share_master_weights` points each master partition at the model's own partition, which
the optimizer then updates in place; DeepSpeed's copy back becomes a copy of a tensor onto
itself, which PyTorch skips. Checkpoints are unchanged: the saved master partition is the
model's partition, value for value.
"""

from __future__ import annotations

from typing import Any

import torch


def partitions(optimizer: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(master, model's own) flat partition of each parameter group of this rank, for a ZeRO
    optimizer (stages 1 to 3); empty for any other optimizer."""
    if hasattr(optimizer, "single_partition_of_fp32_groups"):  # ZeRO-1 and 2
        pairs = []
        for i, master in enumerate(optimizer.single_partition_of_fp32_groups):
            rank = torch.distributed.get_rank(group=optimizer.real_dp_process_group[i])
            pairs.append((master, optimizer.parallel_partitioned_bit16_groups[i][rank]))
        return pairs
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
        masters = optimizer.fp32_partitioned_groups_flat
        return list(zip(masters, optimizer.fp16_partitioned_groups_flat, strict=True))
    return []


def share_master_weights(optimizer: Any) -> int:
    """Make a ZeRO optimizer's fp32 master partitions the model's own partitions where both
    are the same dtype on the same device (not with optimizer offload or NVMe swapping).
    Returns the bytes of master copy freed (0 when there is nothing to share)."""
    if any(
        getattr(optimizer, flag, False)
        for flag in ("cpu_offload", "offload_optimizer", "swap_optimizer")
    ):
        return 0
    freed = 0
    for master, own in partitions(optimizer):
        if own is None or master.data_ptr() == own.data_ptr():
            continue
        if master.dtype != own.dtype or master.device != own.device or master.shape != own.shape:
            continue
        freed += master.numel() * master.element_size()
        master.data = own.data
    if freed:
        optimizer._link_all_hp_params()  # its per-parameter views into the master partitions
    return freed
