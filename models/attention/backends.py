"""Attention backends: how the pairs a pattern allows are computed.

A backend is chosen once, at model construction, for one pattern; an impossible pairing
fails there, naming both. Per batch, the model calls `prepare` once and hands the result to
every layer, which calls `attend`.

Shapes: B batch, H query heads, Hkv key/value heads, Lq queries, Lk keys, D head dim.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from models.attention.blocksparse import (
    BlockSparsePlan,
    _document_tiles,
    block_sparse_attention,
    build_plan,
)
from models.attention.patterns import AttentionSpecError, MaskMod, Pattern


@dataclass
class BatchGeometry:
    """What every attention layer needs to know about the current batch."""

    q_len: int
    kv_len: int
    q_offset: int = 0  # absolute position of the first query (KV-cache decoding)
    key_padding_mask: Tensor | None = None  # (B, Lk) bool, True for real tokens
    alibi_slopes: Tensor | None = None  # (H,) ALiBi slopes, or None
    device: torch.device | None = None
    # (B, Lk) packed sequences: a query meets keys of its own document only (ids ascending)
    document_ids: Tensor | None = None
    self_attention: bool = True  # False for cross-attention (keys from another sequence)

    @property
    def is_aligned(self) -> bool:
        """Queries and keys are the same positions (training, prefill without cache)."""
        return self.self_attention and self.q_offset == 0 and self.q_len == self.kv_len

    @property
    def is_plain(self) -> bool:
        """No padding, no documents, no bias, aligned: the kernel may use its own mask."""
        return (
            self.is_aligned
            and self.key_padding_mask is None
            and self.document_ids is None
            and self.alibi_slopes is None
        )


def dense_bias(pattern: Pattern, geo: BatchGeometry, dtype: torch.dtype) -> Tensor:
    """(B|1, H|1, Lq, Lk) additive mask: 0 (or the ALiBi bias) where allowed, -inf elsewhere."""
    q_idx = torch.arange(geo.q_offset, geo.q_offset + geo.q_len, device=geo.device)
    k_idx = torch.arange(geo.kv_len, device=geo.device)
    allowed = pattern.token_mask(q_idx, k_idx, geo.kv_len).unsqueeze(0)  # (1, H|1, Lq, Lk)
    if geo.document_ids is not None:
        docs = geo.document_ids
        allowed = allowed & (docs[:, q_idx][:, None, :, None] == docs[:, None, None, :])
    if geo.key_padding_mask is not None or geo.document_ids is not None:
        if geo.key_padding_mask is not None:
            allowed = allowed & geo.key_padding_mask[:, None, None, :]
        # A query with no key to attend (a padding query whose keys are all padding) would
        # give NaN through softmax; let it attend everything instead. Its output is
        # padding and never read, but NaN would poison the backward pass.
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=geo.device)
    if geo.alibi_slopes is not None:
        distance = (q_idx[:, None] - k_idx[None, :]).abs().to(dtype)  # (Lq, Lk)
        bias = bias - geo.alibi_slopes.to(dtype)[None, :, None, None] * distance
    return bias.masked_fill(~allowed, float("-inf"))


class Backend(ABC):
    """Computes attention for one pattern."""

    name: ClassVar[str]
    supports_alibi: ClassVar[bool] = True
    supports_dropout: ClassVar[bool] = True

    LENGTH_CACHE: ClassVar[int] = 4  # per-length state kept, by length and device

    def __init__(self, pattern: Pattern, block_size: int = 64) -> None:
        self._by_length: dict[tuple[int, str], Any] = {}
        if not self.supports(pattern):
            raise AttentionSpecError(
                f"attention pattern {pattern.name!r} is not supported by backend {self.name!r}"
                f" (backends that support it: {', '.join(backends_for(pattern))})"
            )
        self.pattern = pattern
        self.block_size = block_size

    @classmethod
    @abstractmethod
    def supports(cls, pattern: Pattern) -> bool:
        """Whether this backend computes `pattern` exactly."""

    @abstractmethod
    def prepare(self, geo: BatchGeometry, dtype: torch.dtype) -> Any:
        """Per-batch mask state, built once and shared by every layer."""

    @abstractmethod
    def attend(self, q: Tensor, k: Tensor, v: Tensor, prepared: Any, dropout_p: float) -> Tensor:
        """q (B, H, Lq, D), k and v (B, Hkv, Lk, D) -> (B, H, Lq, D)."""

    def by_length(self, seq_len: int, device: torch.device | None, build: Any) -> Any:
        """`build()`'s result for sequences of `seq_len` on `device`, built once: what
        depends on the length alone (the newest LENGTH_CACHE lengths are kept)."""
        key = (seq_len, str(device))
        if key not in self._by_length:
            if len(self._by_length) >= self.LENGTH_CACHE:
                self._by_length.pop(next(iter(self._by_length)))
            self._by_length[key] = build()
        return self._by_length[key]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_by_length": {}}  # a pickled model carries no masks

    def probs(self, q: Tensor, k: Tensor, geo: BatchGeometry) -> Tensor:
        """(B, H, Lq, Lk) attention probabilities, materialised: for attention maps."""
        k = _repeat_kv(k, q.shape[1])
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        return torch.softmax(scores + dense_bias(self.pattern, geo, q.dtype), dim=-1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pattern={self.pattern!r})"


def _repeat_kv(x: Tensor, n_heads: int) -> Tensor:
    """(B, Hkv, L, D) -> (B, H, L, D): each key/value head serves H/Hkv query heads."""
    groups = n_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


BACKENDS: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    BACKENDS[cls.name] = cls
    return cls


def backends_for(pattern: Pattern) -> list[str]:
    return sorted(name for name, cls in BACKENDS.items() if cls.supports(pattern))


def make_backend(name: str, pattern: Pattern, block_size: int = 64) -> Backend:
    """The backend `name` bound to `pattern`; fails now if the pair cannot work."""
    if name not in BACKENDS:
        raise AttentionSpecError(
            f"unknown attention backend {name!r}; known backends: {', '.join(sorted(BACKENDS))}"
        )
    if not 16 <= block_size <= 128:
        raise AttentionSpecError(f"block_size must be in [16, 128], got {block_size}")
    return BACKENDS[name](pattern, block_size)


@dataclass
class _SDPAMask:
    bias: Tensor | None  # None: no mask, or the kernel's own causal mask
    is_causal: bool


@register_backend
class SDPABackend(Backend):
    """`torch.nn.functional.scaled_dot_product_attention`: dense patterns; the baseline."""

    name: ClassVar[str] = "sdpa"

    @classmethod
    def supports(cls, pattern: Pattern) -> bool:
        return pattern.is_dense

    def prepare(self, geo: BatchGeometry, dtype: torch.dtype) -> _SDPAMask:
        if geo.is_plain:
            # No mask tensor at all: lets SDPA pick its fused (flash) kernels.
            return _SDPAMask(bias=None, is_causal=self.pattern.causal)
        return _SDPAMask(bias=dense_bias(self.pattern, geo, dtype), is_causal=False)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, prepared: Any, dropout_p: float) -> Tensor:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=prepared.bias,
            dropout_p=dropout_p,
            is_causal=prepared.is_causal,
            enable_gqa=k.shape[1] != q.shape[1],
        )


@register_backend
class ReferenceBackend(Backend):
    """Masked dense softmax written out in PyTorch: every pattern, O(S^2) memory; for tests."""

    name: ClassVar[str] = "reference"

    @classmethod
    def supports(cls, pattern: Pattern) -> bool:
        return True

    def prepare(self, geo: BatchGeometry, dtype: torch.dtype) -> Tensor:
        return dense_bias(self.pattern, geo, dtype)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, prepared: Any, dropout_p: float) -> Tensor:
        return _masked_softmax_attention(q, k, v, prepared, dropout_p)


def _masked_softmax_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, dropout_p: float = 0.0
) -> Tensor:
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
    p = torch.softmax(scores.float() + bias.float(), dim=-1).to(q.dtype)
    p = F.dropout(p, dropout_p) if dropout_p > 0 else p
    return p @ v


@register_backend
class BlockSparseBackend(Backend):
    """Block-sparse attention in plain PyTorch (models.attention.blocksparse): every pattern,
    forward and backward on any device, memory O(S * blocks per row * block).

    Decoding with a KV cache (a few queries against many keys) falls back to masked dense
    softmax over the cached keys, which is O(queries x keys) and exact.
    """

    name: ClassVar[str] = "blocksparse"
    supports_alibi: ClassVar[bool] = False
    supports_dropout: ClassVar[bool] = False

    @classmethod
    def supports(cls, pattern: Pattern) -> bool:
        return True

    def prepare(self, geo: BatchGeometry, dtype: torch.dtype) -> Any:
        if not geo.is_aligned:
            return dense_bias(self.pattern, geo, dtype)
        if geo.document_ids is not None or geo.key_padding_mask is not None:
            return build_plan(
                self.pattern,
                geo.q_len,
                self.block_size,
                geo.device,
                geo.document_ids,
                geo.key_padding_mask,
            )
        # Without documents or padding the plan depends on the length alone: built once, not
        # every step (about 0.1 s at 16K tokens).
        return self.by_length(
            geo.q_len,
            geo.device,
            lambda: build_plan(self.pattern, geo.q_len, self.block_size, geo.device),
        )

    def attend(self, q: Tensor, k: Tensor, v: Tensor, prepared: Any, dropout_p: float) -> Tensor:
        if isinstance(prepared, BlockSparsePlan):
            return block_sparse_attention(q, k, v, prepared)
        return _masked_softmax_attention(q, k, v, prepared)


_compiled_flex: Any = None

# FlexAttention's tile: the BlockMask's block size. torch 2.13 compiles flex with one default
# Triton config per (GPU generation, dtype, head_dim); the forward refuses a BlockMask block
# that its BLOCK_M or BLOCK_N does not divide ("Q and KV block size must be divisible by
# BLOCK_M and BLOCK_N"), and the backward skips a default config that does not divide it
# before any `kernel_options` apply, leaving no kernel at all. Those defaults reach 128 (bf16
# at head_dim 64 and 128 on H100 and B200: a (128, 128) forward, (64, 128, 128, 64) backward)
# and every one of them divides 128 (tests/test_flex_tiles.py reads them all from torch), so
# the mask is built on 128-token tiles, whatever the pattern's own block: its layout at 128
# is exact (computed from the tiles' ranges), and mask_mod keeps every token exact.
FLEX_BLOCK = 128


@register_backend
class FlexBackend(Backend):
    """PyTorch FlexAttention with a BlockMask built from the pattern's analytic layout (never
    by evaluating the mask on S x S points). Compiled on CUDA, where it is the fast path; on
    CPU it runs the forward pass only (FlexAttention has no CPU backward).

    The pattern's layout, its fully allowed tiles and its BlockMask are built once per
    length and device; a batch with documents or padding combines them with per-block
    document and padding tables, on the device, with no host sync."""

    name: ClassVar[str] = "flex"
    supports_alibi: ClassVar[bool] = False
    supports_dropout: ClassVar[bool] = False

    @classmethod
    def supports(cls, pattern: Pattern) -> bool:
        return True

    def layout(self, seq_len: int, device: torch.device | None) -> FlexLayout:
        return self.by_length(
            seq_len, device, lambda: FlexLayout.build(self.pattern, seq_len, device)
        )

    def prepare(self, geo: BatchGeometry, dtype: torch.dtype) -> Any:
        if not geo.is_aligned:  # decoding with a KV cache: exact dense fallback, as blocksparse
            return dense_bias(self.pattern, geo, dtype)
        layout = self.layout(geo.q_len, geo.device)
        return layout.block_mask(geo.document_ids, geo.key_padding_mask)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, prepared: Any, dropout_p: float) -> Tensor:
        if isinstance(prepared, Tensor):
            return _masked_softmax_attention(q, k, v, prepared)
        if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
            raise AttentionSpecError(
                "backend 'flex' has no backward pass on CPU (a FlexAttention limit); "
                "train with backend 'blocksparse' on CPU"
            )
        from torch.nn.attention.flex_attention import flex_attention

        global _compiled_flex
        gqa = k.shape[1] != q.shape[1]
        if q.device.type == "cuda":
            if _compiled_flex is None:
                _compiled_flex = torch.compile(flex_attention, dynamic=False)
            return _compiled_flex(q, k, v, block_mask=prepared, enable_gqa=gqa)
        with warnings.catch_warnings():  # eager on CPU is expected: it is the forward check
            warnings.simplefilter("ignore", UserWarning)
            q, k, v = q.detach(), k.detach(), v.detach()  # no grad here: checked above
            return flex_attention(q, k, v, block_mask=prepared, enable_gqa=gqa)


@dataclass
class FlexLayout:
    """A pattern's FlexAttention tiles at one length, on one device: (Hm, N, N) bool tables
    of tiles with any allowed pair (`valid`) and with every pair allowed (`full`), the
    pattern's mask_mod with its tables on the device, and the BlockMask of a batch with
    neither documents nor padding."""

    seq_len: int
    valid: Tensor
    full: Tensor
    rule: MaskMod
    plain: Any  # BlockMask

    TILES_PER_PASS: ClassVar[int] = 512  # tiles per evaluation: 64 MB of int64 indices

    @classmethod
    def build(cls, pattern: Pattern, seq_len: int, device: torch.device | None) -> FlexLayout:
        bs = FLEX_BLOCK
        valid = pattern.block_layout(seq_len, bs).to(device)  # (Hm, N, N)
        rule = pattern.mask_mod_for(seq_len, device=device)
        full = torch.zeros_like(valid)
        # Fully allowed tiles need no mask_mod: find them by evaluating the rule on the valid
        # tiles only (O(tiles x bs^2), once per length). A tile across the end of the
        # sequence stays partial: flex's own bound check is not a full tile's.
        h, qb, kb = valid.nonzero(as_tuple=True)
        r = torch.arange(bs, device=valid.device)
        for i in range(0, h.numel(), cls.TILES_PER_PASS):
            hh, qq, kk = (x[i : i + cls.TILES_PER_PASS] for x in (h, qb, kb))
            q = (qq * bs).view(-1, 1, 1) + r.view(1, -1, 1)
            k = (kk * bs).view(-1, 1, 1) + r.view(1, 1, -1)
            heads = hh.view(-1, 1, 1) if pattern.n_heads > 1 else None
            inside = ((qq + 1) * bs <= seq_len) & ((kk + 1) * bs <= seq_len)
            full[hh, qq, kk] = rule(None, heads, q, k).expand(-1, bs, bs).flatten(1).all(1) & inside
        plain = _block_mask(valid[None], full[None], rule, seq_len)
        return cls(seq_len, valid, full, rule, plain)

    def block_mask(self, document_ids: Tensor | None, key_padding_mask: Tensor | None) -> Any:
        """The BlockMask of a batch: the pattern's tiles, less those that documents or
        padding leave empty; full only where one document covers both blocks and no key
        is padding. Tensor ops only: no host sync, however the batch looks."""
        if document_ids is None and key_padding_mask is None:
            return self.plain
        bs, n, S = FLEX_BLOCK, self.valid.shape[-1], self.seq_len
        valid, full = self.valid[None], self.full[None]  # (1, Hm, N, N)
        if document_ids is not None:
            first, last = _block_ends(document_ids, n, bs)  # (B, N) ids ascend along a row
            valid = valid & _document_tiles(document_ids, S, bs)
            single = first == last  # the block lies in one document
            same = (
                single[:, :, None] & single[:, None, :] & (first[:, :, None] == first[:, None, :])
            )
            full = full & same[:, None]
        if key_padding_mask is not None:
            keep = F.pad(key_padding_mask, (0, n * bs - S), value=False).view(-1, n, bs)
            valid = valid & keep.any(-1)[:, None, None, :]
            full = full & keep.all(-1)[:, None, None, :]
        rule, docs, keep_ = self.rule, document_ids, key_padding_mask

        def mask_mod(b: Any, h: Any, q_idx: Tensor, k_idx: Tensor) -> Tensor:
            allowed = rule(b, h, q_idx, k_idx)
            if docs is not None:
                allowed = allowed & (docs[b, q_idx] == docs[b, k_idx])
            if keep_ is not None:
                allowed = allowed & keep_[b, k_idx]
            return allowed

        return _block_mask(valid, full, mask_mod, S)


def flex_block_mask(pattern: Pattern, geo: BatchGeometry) -> Any:
    """The FlexAttention BlockMask of `pattern` for one batch (FlexBackend.prepare without
    the backend's cache)."""
    layout = FlexLayout.build(pattern, geo.q_len, geo.device)
    return layout.block_mask(geo.document_ids, geo.key_padding_mask)


def _block_ends(ids: Tensor, n: int, bs: int) -> tuple[Tensor, Tensor]:
    """(B, N) the first and last id of each block (the last id repeats past the end)."""
    pad = n * bs - ids.shape[1]
    padded = torch.cat([ids, ids[:, -1:].expand(-1, pad)], dim=1) if pad else ids
    blocks = padded.view(ids.shape[0], n, bs)
    return blocks[..., 0], blocks[..., -1]


def _ordered(tiles: Tensor) -> tuple[Tensor, Tensor]:
    """(..., N) int32 count and (..., N, N) int32 column indices of the True tiles of each
    row, first: BlockMask's form (stable sort, on the device)."""
    count = tiles.sum(-1, dtype=torch.int32)
    idx = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True)
    return count, idx.to(torch.int32)


def _block_mask(valid: Tensor, full: Tensor, mask_mod: MaskMod, seq_len: int) -> Any:
    from torch.nn.attention.flex_attention import BlockMask

    kv_num, kv_idx = _ordered(valid & ~full)
    full_num, full_idx = _ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=FLEX_BLOCK,
        mask_mod=mask_mod,
        seq_lengths=(seq_len, seq_len),
    )


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Pattern,
    backend: str = "blocksparse",
    block_size: int = 64,
    document_ids: Tensor | None = None,
) -> Tensor:
    """Attention restricted to `pattern`: q (B, H, S, D), k and v (B, Hkv, S, D).

    Builds the per-batch mask once; inside a model, the stack does this for all layers.
    """
    impl = make_backend(backend, pattern, block_size)
    geo = BatchGeometry(
        q_len=q.shape[2], kv_len=k.shape[2], device=q.device, document_ids=document_ids
    )
    return impl.attend(q, k, v, impl.prepare(geo, q.dtype), 0.0)
