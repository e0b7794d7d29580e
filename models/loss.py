"""The LM head and its cross-entropy, optionally in chunks that never build the logits.

A (batch, seq, vocab) fp32 logits tensor is 2 GiB at 64K tokens with an 8K vocabulary, and
its loss keeps as much again (the log-softmax) plus its gradients. With `chunk_tokens`
set, the head and the loss run on that many tokens at a time, each chunk under activation
checkpointing: forward keeps only the chunk's summed loss, backward recomputes the chunk's
logits, and the peak holds one chunk's logits and their gradients. The value and the
gradients equal the whole-sequence loss (the order of a float sum aside).

Shapes: B batch, L tokens, C model width, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100  # labels of positions without a target


class LMHead(nn.Linear):
    """The output projection to the vocabulary. Called with hidden states alone it returns
    the logits; with labels it returns the summed cross-entropy over the labelled positions
    (fp32, or fp64 for an fp64 model), in chunks of `chunk_tokens` when that is set. The
    loss runs inside this module's forward, so ZeRO-3 gathers the weight for it as for any
    layer."""

    chunk_tokens: int | None = None  # set by models.transformer.set_loss_chunking

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if labels is None:
            return super().forward(x)  # (B, L, V)
        x, labels = x.flatten(0, -2), labels.flatten()  # (B*L, C), (B*L,)
        chunk = self.chunk_tokens
        if chunk is None or chunk >= x.shape[0]:
            return _chunk_loss(x, labels, self.weight, self.bias)
        total = x.new_zeros((), dtype=_loss_dtype(x.dtype))
        for start in range(0, x.shape[0], chunk):
            part = slice(start, start + chunk)
            total = total + checkpoint(
                _chunk_loss, x[part], labels[part], self.weight, self.bias, use_reentrant=False
            )
        return total


def _chunk_loss(x: Tensor, labels: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    logits = F.linear(x, weight, bias)
    return F.cross_entropy(
        logits.to(_loss_dtype(logits.dtype)), labels, ignore_index=IGNORE, reduction="sum"
    )


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit (and fp32) logits, fp64 for fp64 ones."""
    return torch.promote_types(dtype, torch.float32)
