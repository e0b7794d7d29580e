"""Training objectives, one per model family, on batches of the shard format
(pipeline/data/shards.py): causal LM for the decoder, masked LM for the encoder,
sequence-to-sequence LM for the encoder-decoder.

Each objective turns a (B, 2, L) uint32 batch of token ids and document ids into the
model's inputs and returns (summed loss, number of predicted tokens), so evaluation can
average over tokens exactly and training can take the mean. The model computes the loss
itself (models/loss.py), so a chunked loss never builds the logits.

Sequence parallel over P ranks (models/parallel.py), every rank of a group gets the whole
batch; the model computes the loss of the rank's slice of each sequence, and the counts say
how many targets the slice holds and how many the group's whole sequences hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from models.loss import IGNORE
from pipeline.data.shards import PAD_DOC


@dataclass(frozen=True)
class LossParts:
    loss_sum: Tensor  # 0-d fp32 on the model's device: this rank's summed token losses
    count: int  # the targets behind it
    group_count: int  # the targets of the whole sequences (= count without parallelism)

    def mean(self, sequence_parallel: int = 1) -> Tensor:
        """What this rank backpropagates for the group's token mean: its sum over the
        group's count, times P, since DeepSpeed averages gradients over every rank while the
        P ranks of a group each hold a part of one mean (their gradients add up)."""
        return self.loss_sum * sequence_parallel / max(self.group_count, 1)


@dataclass(frozen=True)
class Objective:
    family: str
    special_ids: dict[str, int]
    document_masking: bool = True
    mlm_probability: float = 0.15
    max_source_len: int | None = None
    vocab_size: int = 0
    sp_rank: int = 0  # this rank's slice of each sequence, of sp_size
    sp_size: int = 1

    def loss(
        self, model: nn.Module, batch: np.ndarray, generator: torch.Generator | None = None
    ) -> tuple[Tensor, int]:
        """(sum of token losses, token count) of `model` on `batch` (this rank's slice)."""
        parts = self.loss_parts(model, batch, generator)
        return parts.loss_sum, parts.count

    def loss_parts(
        self, model: nn.Module, batch: np.ndarray, generator: torch.Generator | None = None
    ) -> LossParts:
        tokens = torch.from_numpy(batch[:, 0].astype(np.int64))
        docs = torch.from_numpy(batch[:, 1].astype(np.int64))
        real = docs != int(PAD_DOC)
        device = next(model.parameters()).device
        if self.family in ("decoder", "encoder"):
            if self.family == "decoder":
                inputs, labels = tokens[:, :-1], tokens[:, 1:].masked_fill(~real[:, 1:], IGNORE)
            else:
                inputs, labels = self._mask(tokens[:, :-1], real[:, :-1], generator)
            document_ids = docs[:, :-1] if self.document_masking else None
            count = self._counts(labels)  # on the host, before the copy: no device sync
            loss = model(
                inputs.to(device),
                key_padding_mask=_to(padding_or_none(real[:, :-1]), device),
                document_ids=_to(documents_or_none(document_ids), device),
                labels=labels.to(device),
            )
        else:
            s = self.max_source_len
            if s is None:
                raise ValueError("an encoder-decoder objective needs max_source_len")
            src, tgt = tokens[:, :s], tokens[:, s:]
            tgt_real = real[:, s:]
            labels = tgt[:, 1:].masked_fill(~tgt_real[:, 1:], IGNORE)
            count = self._counts(labels)
            loss = model(
                src.to(device),
                tgt[:, :-1].to(device),
                src_padding_mask=_to(padding_or_none(real[:, :s]), device),
                tgt_padding_mask=_to(padding_or_none(tgt_real[:, :-1]), device),
                labels=labels.to(device),
            )
        return LossParts(loss, *count)

    def _counts(self, labels: Tensor) -> tuple[int, int]:
        """Targets in this rank's slice of the sequences, and in the whole sequences."""
        target = labels != IGNORE
        n = labels.shape[1] // self.sp_size
        return int(target[:, self.sp_rank * n : (self.sp_rank + 1) * n].sum()), int(target.sum())

    def _mask(
        self, tokens: Tensor, real: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """BERT's corruption: pick mlm_probability of the real tokens; of those, 80% become
        the mask token, 10% a random token, 10% stay; labels only at the picked positions."""
        mask_id = self.special_ids.get("mask")
        if mask_id is None:
            raise ValueError("a masked-LM objective needs a tokenizer with a <|mask|> token")
        shape = tokens.shape
        # on the host, whatever the default device: the batch and the generator are there
        pick = (torch.rand(shape, generator=generator, device="cpu") < self.mlm_probability) & real
        labels = tokens.masked_fill(~pick, IGNORE)
        roll = torch.rand(shape, generator=generator, device="cpu")
        inputs = tokens.masked_fill(pick & (roll < 0.8), mask_id)
        random = torch.randint(0, self.vocab_size, shape, generator=generator, device="cpu")
        swap = pick & (roll >= 0.8) & (roll < 0.9)
        inputs = torch.where(swap, random, inputs)
        return inputs, labels


# A mask that changes nothing is passed as None: the attention backends then reuse the
# pattern's own layout (cached by length) instead of building a per-batch mask, and SDPA
# keeps its fused causal kernels. Both checks run on the host batch, before any copy.


def padding_or_none(real: Tensor) -> Tensor | None:
    """The key padding mask, or None when every token is real."""
    return None if bool(real.all()) else real


def documents_or_none(document_ids: Tensor | None) -> Tensor | None:
    """The document ids, or None when each row is one document (nothing to separate)."""
    if document_ids is None or bool((document_ids == document_ids[:, :1]).all()):
        return None
    return document_ids


def _to(x: Tensor | None, device: torch.device) -> Tensor | None:
    return None if x is None else x.to(device, non_blocking=True)
