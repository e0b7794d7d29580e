"""The tokenizer: a byte-level BPE trained with Hugging Face `tokenizers` on a sample of the
corpus, or loaded from a tokenizer.json. Byte-level means no text is ever unknown."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from pipeline.errors import DataError

EOD = "<|endoftext|>"  # end of document: separates packed documents
PAD = "<|pad|>"  # fills the tail of the last block and short seq2seq rows
BOS = "<|bos|>"  # first decoder input of a seq2seq target
MASK = "<|mask|>"  # replaces the tokens a masked-LM encoder learns to predict
SPECIAL_TOKENS = [EOD, PAD, BOS, MASK]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of `vocab_size` entries (special tokens included), trained on `texts`.

    Training is deterministic for the same texts in the same order."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    try:
        tok = Tokenizer.from_file(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: no such tokenizer file") from None
    except Exception as exc:
        raise DataError(f"{path}: not a tokenizer.json: {str(exc).splitlines()[0]}") from None
    for special in (EOD, PAD):
        if tok.token_to_id(special) is None:
            raise DataError(f"{path}: the tokenizer has no {special} token")
    return tok


def tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def special_ids(tok: Tokenizer) -> dict[str, int]:
    ids = {
        name: tok.token_to_id(token)
        for name, token in (("eod", EOD), ("pad", PAD), ("bos", BOS), ("mask", MASK))
    }
    return {k: v for k, v in ids.items() if v is not None}
