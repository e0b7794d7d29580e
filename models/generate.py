"""Autoregressive generation for the decoder and the encoder-decoder: greedy, temperature
and top-k sampling, with or without a key/value cache (the two give the same tokens).

Shapes: B batch, P prompt length, N new tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from models.layers import KVCache
from models.transformer import DecoderLM, EncoderDecoderLM


def sample_next(
    logits: Tensor,  # (B, V)
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B,) next tokens: argmax when temperature is 0, else a sample from the tempered,
    optionally top-k truncated distribution."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# A step function takes (all tokens so far, the tokens not yet fed, the cache or None) and
# returns the logits of the last position, (B, V).
StepFn = Callable[[Tensor, Tensor, KVCache | None], Tensor]


def _decode(
    step: StepFn,
    tokens: Tensor,  # (B, P)
    cache: KVCache | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    eos_id: int | None,
    generator: torch.Generator | None,
    on_token: Callable[[Tensor], None] | None = None,
) -> Tensor:
    new = tokens
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for _ in range(max_new_tokens):
        logits = step(tokens, new, cache)
        nxt = sample_next(logits, temperature, top_k, generator)
        if eos_id is not None:
            nxt = nxt.masked_fill(finished, eos_id)  # a finished row keeps emitting eos
            finished |= nxt == eos_id
        if on_token is not None:
            on_token(nxt)
        new = nxt[:, None]
        tokens = torch.cat([tokens, new], dim=1)
        if eos_id is not None and bool(finished.all()):
            break
    return tokens


@torch.no_grad()
def generate(
    model: DecoderLM,
    prompt: Tensor,  # (B, P)
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    use_cache: bool = True,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    on_token: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """(B, P + N) prompt followed by generated tokens; `on_token` sees each step's (B,)."""

    def step(tokens: Tensor, new: Tensor, cache: KVCache | None) -> Tensor:
        if cache is None:
            return model(tokens)[:, -1]
        return model(new, cache=cache)[:, -1]

    cache = model.new_cache() if use_cache else None
    return _decode(
        step, prompt, cache, max_new_tokens, temperature, top_k, eos_id, generator, on_token
    )


@torch.no_grad()
def generate_seq2seq(
    model: EncoderDecoderLM,
    src: Tensor,  # (B, Ssrc)
    max_new_tokens: int,
    bos_id: int,
    src_padding_mask: Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    use_cache: bool = True,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    on_token: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """(B, 1 + N) target tokens starting with `bos_id`; the source is encoded once."""
    memory = model.encode(src, src_padding_mask)

    def step(tokens: Tensor, new: Tensor, cache: KVCache | None) -> Tensor:
        if cache is None:
            return model.decode(tokens, memory, src_padding_mask)[:, -1]
        return model.decode(new, memory, src_padding_mask, cache=cache)[:, -1]

    start = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
    cache = model.new_cache() if use_cache else None
    return _decode(
        step, start, cache, max_new_tokens, temperature, top_k, eos_id, generator, on_token
    )


EOD, BOS, MASK = "<|endoftext|>", "<|bos|>", "<|mask|>"


@torch.no_grad()
def complete(
    model: torch.nn.Module,
    tokenizer: Any,  # a `tokenizers.Tokenizer`
    family: str,
    prompt: str,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """The text a trained model makes of `prompt`: a decoder continues it, an
    encoder-decoder generates its target, an encoder fills each <|mask|> token (at once: no
    sampling). `on_text` gets the text as it grows, piece by piece (decoded from all tokens
    so far, so a character split over byte-level tokens comes out whole)."""
    eod = tokenizer.token_to_id(EOD)
    ids = torch.tensor([tokenizer.encode(prompt).ids], dtype=torch.long)
    if family == "encoder":
        best = model(ids).argmax(-1)[0]
        filled = torch.where(ids[0] == tokenizer.token_to_id(MASK), best, ids[0])
        text = tokenizer.decode([int(t) for t in filled if int(t) != eod])
        if on_text is not None:
            on_text(text)
        return text
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    out: list[int] = []
    shown = ""

    def grow(nxt: Tensor) -> None:
        nonlocal shown
        if int(nxt[0]) == eod:
            return
        out.append(int(nxt[0]))
        text = tokenizer.decode(out)
        if on_text is not None and text.startswith(shown) and not text.endswith("\ufffd"):
            on_text(text[len(shown) :])
            shown = text

    sampling = dict(temperature=temperature, top_k=top_k, eos_id=eod, generator=generator)
    if family == "decoder":
        generate(model, ids, max_new_tokens, on_token=grow, **sampling)
    else:
        bos = tokenizer.token_to_id(BOS)
        generate_seq2seq(model, ids, max_new_tokens, bos, on_token=grow, **sampling)
    text = tokenizer.decode(out)
    if on_text is not None and len(text) > len(shown):
        on_text(text[len(shown) :] if text.startswith(shown) else text)
    return text
