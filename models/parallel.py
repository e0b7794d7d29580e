"""Sequence parallelism (Ulysses; Jacobs et al. 2023, "DeepSpeed Ulysses").

P ranks share each sample: each holds a contiguous 1/P slice of the sequence for the
embeddings, norms, MLPs, residual stream and loss. Around attention an all-to-all trades
sequence slices for heads, so each rank's attention backend sees the **whole sequence** for
H/P heads, and a second all-to-all trades back. Every pattern's plan (BigBird's random and
global blocks, Longformer's globals, document masks, prefix-LM) is therefore exactly the
plan without parallelism, for the rank's own heads; no softmax statistics cross ranks, as
ring attention's would. Positions stay global (each rank embeds and rotates its slice at
its own offset), and per-head things (BigBird `per_head` layouts, ALiBi slopes, adaptive
spans) are sliced to the rank's heads. Key/value heads fewer than P (GQA, MQA) are copied so
that each rank gets the one its query heads read.

The all-to-all needs only `torch.distributed.all_to_all_single`: gloo on CPU, NCCL on GPU.

Shapes: B batch, H heads, S whole sequence, S/P a rank's slice, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's place in its sequence-parallel group."""

    group: Any  # a torch.distributed ProcessGroup of the P ranks sharing a sequence
    size: int
    rank: int  # within the group: the rank holds slice `rank` of every sequence

    def span(self, length: int) -> tuple[int, int]:
        """[start, stop) of this rank's slice of a sequence of `length`."""
        if length % self.size:
            raise ValueError(f"a sequence of {length} tokens does not split over {self.size} ranks")
        n = length // self.size
        return self.rank * n, (self.rank + 1) * n

    def local(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's slice of `x` along its sequence dimension `dim`."""
        start, stop = self.span(x.shape[dim])
        return x.narrow(dim, start, stop - start)

    def heads(self, n_heads: int) -> slice:
        """The heads this rank attends with, of `n_heads`."""
        per = n_heads // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def to_heads(self, x: Tensor) -> Tensor:
        """(B, H, S/P, D) -> (B, H/P, S, D): this rank's heads over the whole sequence."""
        return _AllToAll.apply(x, self.group, self.size, 1, 2)

    def to_sequence(self, x: Tensor) -> Tensor:
        """(B, H/P, S, D) -> (B, H, S/P, D): back to this rank's slice, every head."""
        return _AllToAll.apply(x, self.group, self.size, 2, 1)

    def to_heads_kv(self, x: Tensor) -> Tensor:
        """to_heads for keys or values (B, Hkv, S/P, D): with fewer key/value heads than
        ranks, each is first copied P/Hkv times, so rank r gets the head its queries read
        (query head h reads key/value head h * Hkv / H)."""
        if x.shape[1] < self.size:
            x = x.repeat_interleave(self.size // x.shape[1], dim=1)
        return self.to_heads(x)


def _all_to_all(x: Tensor, group: Any, size: int, scatter: int, gather: int) -> Tensor:
    """Split `x` in `size` chunks along `scatter`, send chunk j to rank j, and join what
    comes back along `gather`, in rank order."""
    send = torch.stack(x.chunk(size, dim=scatter)).contiguous()  # (P, ...)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather)


class _AllToAll(torch.autograd.Function):
    """The all-to-all, with its inverse as the backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any, size: int, scatter: int, gather: int) -> Tensor:
        ctx.args = group, size, scatter, gather
        return _all_to_all(x, group, size, scatter, gather)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        group, size, scatter, gather = ctx.args
        return _all_to_all(grad.contiguous(), group, size, gather, scatter), None, None, None, None


def sequence_groups(size: int) -> SequenceParallel | None:
    """Groups of `size` consecutive ranks of the initialised default group (every rank must
    call this, in the same order, as torch.distributed.new_group requires); this rank's, or
    None when `size` is 1."""
    if size == 1:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % size:
        raise ValueError(f"sequence_parallel {size} does not divide the {world} workers")
    mine = None
    for first in range(0, world, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = SequenceParallel(group, size, rank - first)
    return mine


def set_sequence_parallel(model: nn.Module, sp: SequenceParallel | None) -> None:
    """Run `model`'s self-attention stacks sequence-parallel over `sp`'s group (None: off
    again, for example to draw attention maps of a short snippet on one rank). The model
    then takes whole sequences and computes on this rank's slice: a decoder's or encoder's
    forward returns the logits (or the loss) of the slice."""
    from models.transformer import TransformerStack

    stacks = [m for m in model.modules() if isinstance(m, TransformerStack)]
    if sp is not None and any(stack.cross_backend is not None for stack in stacks):
        raise ValueError("sequence parallelism is for decoders and encoders, not encoder-decoders")
    for stack in stacks:
        stack.set_sequence_parallel(sp)


def sequence_parallel_of(model: nn.Module) -> SequenceParallel | None:
    """The sequence-parallel group `model` runs over, or None."""
    from models.transformer import TransformerStack

    for m in model.modules():
        if isinstance(m, TransformerStack):
            return m.sp
    return None
