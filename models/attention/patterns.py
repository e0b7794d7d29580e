"""Attention patterns: which (query, key) pairs may meet.

A pattern is data, not a module. It answers the same question three ways:
- `mask_mod(b, h, q_idx, k_idx)`: the exact token-level rule, FlexAttention's signature,
  vectorised over broadcastable index tensors (`mask_mod_for(seq_len, device=...)` where the
  rule depends on the length, as BigBird's random blocks do; its lookup tables are built
  once, on the device, so torch.compile traces the rule in one graph);
- `block_layout(seq_len, block_size)`: which (query block, key block) tiles hold any allowed
  pair, computed analytically from each tile's position range, never by evaluating S x S
  points;
- `dense_mask(seq_len)`: the materialised boolean mask, for the reference and for tests.

Every causal pattern also takes `prefix=N` (prefix-LM: the first N tokens see each other
in both directions). Document masking for packed sequences composes with every pattern at
run time (`BatchGeometry.document_ids`).

In the pictures, rows are queries, columns keys, `x` an allowed pair.
Shapes: H heads (1 when the layout is shared by all heads), S sequence, N blocks.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

MaskMod = Callable[[Any, Any, Tensor, Tensor], Tensor]
Tables = dict[str, Tensor]  # a pattern's lookup tensors, by name


class AttentionSpecError(ValueError):
    """An attention pattern or backend was asked for with names or parameters that cannot work."""


@dataclass(frozen=True)
class Tiles:
    """Token ranges of every (query block, key block) tile: q in [qlo, qhi], k in [klo, khi].

    qlo/qhi are (N, 1), klo/khi (1, N); a tile's rule holds somewhere in it iff the
    pattern's analytic test on these ranges is true.
    """

    qlo: Tensor
    qhi: Tensor
    klo: Tensor
    khi: Tensor
    block_size: int
    seq_len: int

    @classmethod
    def of(cls, seq_len: int, block_size: int) -> Tiles:
        n = math.ceil(seq_len / block_size)
        lo = torch.arange(n, dtype=torch.int32) * block_size  # int32: half the memory traffic
        hi = torch.clamp(lo + block_size, max=seq_len) - 1
        return cls(lo[:, None], hi[:, None], lo[None, :], hi[None, :], block_size, seq_len)

    def differences(self, dmin: float, dmax: float, step: int = 1) -> Tensor:
        """(N, N): some q - k in [dmin, dmax] that is a multiple of `step` lies in the tile.

        Within a tile q - k takes every integer in [qlo - khi, qhi - klo].
        """
        lo = torch.clamp(self.qlo - self.khi, min=dmin) if dmin > -math.inf else self.qlo - self.khi
        hi = torch.clamp(self.qhi - self.klo, max=dmax) if dmax < math.inf else self.qhi - self.klo
        if step > 1:  # the first multiple of step at or above lo
            lo = torch.div(lo + step - 1, step, rounding_mode="floor") * step
        return lo <= hi

    def causal(self) -> Tensor:
        """(N, N): the tile holds a pair with k <= q."""
        return self.klo <= self.qhi

    def global_rows(self, positions: Sequence[int], causal: bool) -> Tensor:
        """(N, N): a global query position in the query block meets a key of the tile."""
        last = _extreme_in_blocks(positions, self.qlo, self.qhi, last=True)  # (N, 1)
        if not causal:
            return (last >= 0).expand(-1, self.klo.shape[1])
        return last >= self.klo  # the block's last global query sees keys up to itself

    def global_cols(self, positions: Sequence[int], causal: bool) -> Tensor:
        """(N, N): a global key position in the key block is met by a query of the tile."""
        first = _extreme_in_blocks(positions, self.klo, self.khi, last=False)  # (1, N)
        if not causal:
            return (first >= 0).expand(self.qlo.shape[0], -1)
        return (first >= 0) & (first <= self.qhi)  # some query at or after the first global


def _extreme_in_blocks(positions: Sequence[int], lo: Tensor, hi: Tensor, last: bool) -> Tensor:
    """The last (or first) of the sorted `positions` inside each block [lo, hi], else -1:
    a binary search per block, O(N log P)."""
    pos = torch.tensor(sorted(positions), dtype=lo.dtype)
    if pos.numel() == 0:
        return torch.full_like(lo, -1)
    if last:
        i = torch.searchsorted(pos, hi, right=True) - 1
        found = pos[i.clamp(min=0)]
        return torch.where((i >= 0) & (found >= lo), found, torch.full_like(found, -1))
    i = torch.searchsorted(pos, lo)
    found = pos[i.clamp(max=pos.numel() - 1)]
    return torch.where((i < pos.numel()) & (found <= hi), found, torch.full_like(found, -1))


class Pattern(ABC):
    """Base class of every pattern; subclasses are frozen dataclasses of their parameters."""

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    causal: bool
    prefix: int

    def __post_init__(self) -> None:
        if self.prefix < 0:
            raise AttentionSpecError(f"{self.name}: prefix must be >= 0, got {self.prefix}")
        if self.prefix and not self.causal:
            raise AttentionSpecError(f"{self.name}: prefix (prefix-LM) needs causal attention")

    @property
    def is_dense(self) -> bool:
        """True for plain full or causal attention (no sparsity, no prefix)."""
        return False

    @property
    def n_heads(self) -> int:
        """Distinct head layouts: 1 means every head shares one layout."""
        return 1

    # -- the rule, to be given by each pattern -------------------------------------------
    def _tables(self, seq_len: int | None, device: torch.device) -> Tables:
        """The lookup tensors `_rule` reads, built once per `mask_mod_for`; none by default."""
        return {}

    @abstractmethod
    def _rule(self, h: Tensor | None, q: Tensor, k: Tensor, tables: Tables) -> Tensor:
        """True where the pattern (without causality or prefix) lets q meet k: tensor ops on
        the arguments and `tables` only, so that torch.compile traces it in one graph."""

    @abstractmethod
    def _tiles(self, t: Tiles) -> Tensor:
        """(H|1, N, N) or (N, N): tiles holding a pair allowed by `_rule` (and, when causal,
        with k <= q). Exact: a tile is on only if some pair in it is allowed."""

    # -- composed with causality and prefix-LM, here once for all patterns ---------------
    def mask_mod_for(
        self, seq_len: int | None, *, device: torch.device | str | None = None
    ) -> MaskMod:
        """FlexAttention's `mask_mod(b, h, q_idx, k_idx)` for sequences of `seq_len`.

        The tables the rule reads are built here, once, on `device` (CPU by default), and the
        closure captures them: it does tensor ops on its arguments and those tables only, so
        it traces under `torch.compile(fullgraph=True)` as FlexAttention compiles it. Indices
        on another device get a copy of the tables on every call: pass the device they are on.
        FlexAttention always gets a length: with `seq_len=None` causal BigBird sizes its random
        draws from the largest query index, a host sync that works in eager only.
        """
        tables = self._tables(seq_len, torch.device("cpu" if device is None else device))

        def mask_mod(b: Any, h: Any, q_idx: Tensor, k_idx: Tensor) -> Tensor:
            allowed = self._rule(h, q_idx, k_idx, tables)
            if self.causal:
                allowed = allowed & (k_idx <= q_idx)
            if self.prefix:
                allowed = allowed | ((q_idx < self.prefix) & (k_idx < self.prefix))
            return allowed

        return mask_mod

    def mask_mod(self, b: Any, h: Any, q_idx: Tensor, k_idx: Tensor) -> Tensor:
        """The token-level rule; patterns whose rule depends on length use mask_mod_for."""
        return self.mask_mod_for(None, device=q_idx.device)(b, h, q_idx, k_idx)

    def validate(self, seq_len: int) -> None:  # noqa: B027 - optional hook, no-op by default
        """Raise AttentionSpecError if the parameters do not fit sequences of `seq_len`."""

    def block_layout(self, seq_len: int, block_size: int) -> Tensor:
        """(H|1, N, N) bool: tiles that contain at least one allowed pair."""
        self.validate(seq_len)
        t = Tiles.of(seq_len, block_size)
        grid = self._tiles(t)
        if self.causal:
            grid = grid & t.causal()
        if self.prefix:
            grid = grid | ((t.qlo < self.prefix) & (t.klo < self.prefix))
        return grid if grid.dim() == 3 else grid.unsqueeze(0)

    def token_mask(self, q_idx: Tensor, k_idx: Tensor, seq_len: int | None = None) -> Tensor:
        """(H|1, Lq, Lk) bool for the given query and key positions."""
        heads = torch.arange(self.n_heads, device=q_idx.device).view(-1, 1, 1)
        h = heads if self.n_heads > 1 else None
        mask_mod = self.mask_mod_for(seq_len, device=q_idx.device)
        mask = mask_mod(None, h, q_idx[:, None], k_idx[None, :])
        mask = mask.unsqueeze(0) if mask.dim() == 2 else mask
        return mask.expand(mask.shape[0], q_idx.numel(), k_idx.numel())

    def dense_mask(self, seq_len: int) -> Tensor:
        """(H|1, S, S) bool, True where a query may attend a key."""
        self.validate(seq_len)
        idx = torch.arange(seq_len)
        return self.token_mask(idx, idx, seq_len)


PATTERNS: dict[str, type[Pattern]] = {}


def register_pattern(cls: type[Pattern]) -> type[Pattern]:
    PATTERNS[cls.name] = cls
    return cls


def make_pattern(name: str, **params: Any) -> Pattern:
    """Build a pattern by name, e.g. `make_pattern("sliding_window", window=512, causal=True)`."""
    if name not in PATTERNS:
        raise AttentionSpecError(
            f"unknown attention pattern {name!r}; known patterns: {', '.join(sorted(PATTERNS))}"
        )
    try:
        return PATTERNS[name](**params)
    except TypeError as exc:  # unexpected or missing keyword
        message = str(exc).split("__init__() ")[-1]
        raise AttentionSpecError(f"attention pattern {name!r}: {message}") from None


def _positive(pattern: str, **values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise AttentionSpecError(f"{pattern}: {key} must be a positive integer, got {value!r}")


def _positions(pattern: str, key: str, values: Sequence[Any]) -> tuple[int, ...]:
    """Token positions from a list of ints and [start, end) pairs."""
    out: list[int] = []
    for v in values:
        if isinstance(v, (list, tuple)) and len(v) == 2:
            out += range(int(v[0]), int(v[1]))
        elif isinstance(v, int) and not isinstance(v, bool):
            out.append(v)
        else:
            raise AttentionSpecError(f"{pattern}: {key} takes positions or [start, end) pairs")
    if any(p < 0 for p in out):
        raise AttentionSpecError(f"{pattern}: {key} must be >= 0, got {min(out)}")
    return tuple(sorted(set(out)))


def _in_range(pattern: str, key: str, values: Sequence[int], limit: int, unit: str) -> None:
    bad = [v for v in values if v >= limit]
    if bad:
        raise AttentionSpecError(
            f"{pattern}: {key} {bad[0]} is out of range for a sequence of {limit} {unit}"
        )


def _membership(values: Sequence[int], device: torch.device) -> Tensor:
    """(max + 3,) bool lookup table of the set `values` of non-negative ints, for `_in`:
    entry i + 1 says whether i is in the set; the first and last entries are False and stand
    for every index below 0 and above the largest value."""
    table = torch.zeros(max(values, default=-1) + 3, dtype=torch.bool)
    if values:
        table[torch.tensor(list(values)) + 1] = True
    return table.to(device)


def _in(table: Tensor, idx: Tensor) -> Tensor:
    """idx is in the set of a `_membership` table. One gather, no reduction (as isin or
    `(idx[..., None] == values).any(-1)` would be): FlexAttention compiles a mask_mod into
    its kernel only when every op in it is pointwise."""
    table = _on(table, idx)
    return table[idx.clamp(-1, table.numel() - 2) + 1]


def _on(table: Tensor, like: Tensor) -> Tensor:
    """`table` on the device of `like`; a no-op when mask_mod_for got the right device (the
    check compares devices, not values, so it traces)."""
    return table if table.device == like.device else table.to(like.device)


def _band(q: Tensor, k: Tensor, lo: int, hi: int, step: int = 1) -> Tensor:
    """q - k lies in [lo, hi] and is a multiple of `step`."""
    d = q - k
    allowed = (d >= lo) & (d <= hi)
    return allowed & (d % step == 0) if step > 1 else allowed


def _dilated_reach(window: int, dilation: int, causal: bool) -> tuple[int, int]:
    """The q - k range of a dilated window: `window` keys `dilation` apart."""
    if causal:
        return 0, (window - 1) * dilation
    return -(window // 2) * dilation, (window // 2) * dilation


def block_ranges(starts: Sequence[int], ends: Sequence[int] | None) -> tuple[int, ...]:
    """The blocks `starts` names, or with `ends` the ranges [starts[i], ends[i])."""
    if ends is None:
        return tuple(starts)
    return tuple(b for s, e in zip(starts, ends, strict=True) for b in range(s, e))


class BlockRule(Pattern):
    """A pattern whose rule is defined on blocks of `block` tokens: subclasses give
    `_block_rule(h, qb, kb, tables)`; the token rule and the exact tile layout follow."""

    block: int

    @abstractmethod
    def _block_rule(self, h: Tensor | None, qb: Tensor, kb: Tensor, tables: Tables) -> Tensor:
        """The rule on query and key blocks; h indexes the heads (None: head 0)."""

    def _rule(self, h: Tensor | None, q: Tensor, k: Tensor, tables: Tables) -> Tensor:
        return self._block_rule(h, q // self.block, k // self.block, tables)

    def _tiles(self, t: Tiles) -> Tensor:
        tables = self._tables(t.seq_len, torch.device("cpu"))
        heads = torch.arange(self.n_heads).view(-1, 1, 1)

        def rule(qb: Tensor, kb: Tensor) -> Tensor:
            return self._block_rule(heads, qb, kb, tables)

        return _block_rule_tiles(rule, self.block, self.causal, t)


# ====================================================================== the patterns


@register_pattern
@dataclass(frozen=True)
class Dense(Pattern):
    """Every query meets every key (full), or every key at or before it (causal).

    full (causal=False)      causal (causal=True)
        k 0 1 2 3 4              k 0 1 2 3 4
      q0  x x x x x            q0  x . . . .
      q1  x x x x x            q1  x x . . .
      q2  x x x x x            q2  x x x . .
      q3  x x x x x            q3  x x x x .
      q4  x x x x x            q4  x x x x x
    """

    name: ClassVar[str] = "dense"
    paper: ClassVar[str] = "Vaswani et al. 2017, Attention Is All You Need"
    causal: bool = False
    prefix: int = 0

    @property
    def is_dense(self) -> bool:
        return not self.prefix

    def _rule(self, h: Tensor | None, q: Tensor, k: Tensor, tables: Tables) -> Tensor:
        return torch.ones_like(q == k)

    def _tiles(self, t: Tiles) -> Tensor:
        return torch.ones(t.qlo.shape[0], t.klo.shape[1], dtype=torch.bool)


@register_pattern
@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """Each query meets the `window` keys ending at it (causal), or the keys within
    window // 2 on either side (bidirectional). window=3:

    causal                    bidirectional (window // 2 = 1 each side)
        k 0 1 2 3 4 5             k 0 1 2 3 4 5
      q0  x . . . . .           q0  x x . . . .
      q1  x x . . . .           q1  x x x . . .
      q2  x x x . . .           q2  . x x x . .
      q3  . x x x . .           q3  . . x x x .
      q4  . . x x x .           q4  . . . x x x
      q5  . . . x x x           q5  . . . . x x
    """

    name: ClassVar[str] = "sliding_window"
    paper: ClassVar[str] = "Beltagy et al. 2020 (Longformer); Child et al. 2019; Jiang et al. 2023"
    window: int = 256
    causal: bool = False
    prefix: int = 0

    def __post_init__(self) -> None:
        _positive(self.name, window=self.window)
        super().__post_init__()

    @property
    def reach(self) -> tuple[int, int]:
        """The allowed q - k range."""
        return (0, self.window - 1) if self.causal else (-(self.window // 2), self.window // 2)

    def _rule(self, h: Tensor | None, q: Tensor, k: Tensor, tables: Tables) -> Tensor:
        return _band(q, k, *self.reach)

    def _tiles(self, t: Tiles) -> Tensor:
        return t.differences(*self.reach)


@register_pattern
@dataclass(frozen=True)
class Dilated(Pattern):
    """A sliding window with gaps: `window` keys spaced `dilation` apart, so one layer
    reaches window * dilation tokens back (Longformer's dilated sliding window).
    window=3, dilation=2, causal:

        k 0 1 2 3 4 5 6
      q4  x . x . x . .
      q5  . x . x . x .
      q6  . . x . x . x
    """

    name: ClassVar[str] = "dilated"
    paper: ClassVar[str] = "Beltagy et al. 2020, Longformer, section 3.1"
    window: int = 256
    dilation: int = 2
    causal: bool = False
    prefix: int = 0

    def __post_init__(self) -> None:
        _positive(self.name, window=self.window)
        if not isinstance(self.dilation, int) or self.dilation < 1:
            raise AttentionSpecError(f"dilated: dilation must be >= 1, got {self.dilation!r}")
        super().__post_init__()

    @property
    def reach(self) -> tuple[int, int]:
        return _dilated_reach(self.window, self.dilation, self.causal)

    def _rule(self, h: Tensor | None, q: Tensor, k: Tensor, tables: Tables) -> Tensor:
        return _band(q, k, *self.reach, step=self.dilation)

    def _tiles(self, t: Tiles) -> Tensor:
        return t.differences(*self.reach, step=self.dilation)


@register_pattern
@dataclass(frozen=True)
class Strided(Pattern):
    """Child et al. 2019's strided pattern with stride l: a query meets the previous l
    positions (A1: i - j < l) and every l-th position before it (A2: (i - j) mod l = 0),
    the union of the two factorized heads. Causal only. stride=3:

        k 0 1 2 3 4 5 6 7
      q5  . . x x x x . .      A1: 3, 4, 5   A2: 5, 2
      q7  . x . . x x x x      A1: 5, 6, 7   A2: 7, 4, 1
    """

    name: ClassVar[str] = "strided"
    paper: ClassVar[str] = "Child et al. 2019, Generating Long Sequences with Sparse Transformers"
    stride: int = 128
    causal: bool = True
    prefix: int = 0

    def __post_init__(self) -> None:
        _positive(self.name, stride=self.stride)
        if not self.causal:
            raise AttentionSpecError("strided is defined for causal attention only (Child et al.)")
        super().__post_init__()

    def _rule(self, h: Tensor | None, q: Tensor, k: Tensor, tables: Tables) -> Tensor:
        return (q - k < self.stride) | ((q - k) % self.stride == 0)

    def _tiles(self, t: Tiles) -> Tensor:
        return t.differences(0, self.stride - 1) | t.differences(0, math.inf, step=self.stride)


@register_pattern
@dataclass(frozen=True)
class Fixed(Pattern):
    """Child et al. 2019's fixed pattern: a query meets the earlier keys of its own block of
    length l (A1: floor(j/l) = floor(i/l)), and the last c "summary" positions of every
    block (A2: j mod l >= l - c). Causal only. stride l=4, summary c=1:

        k 0 1 2 3 4 5 6 7 8 9
      q6  . . . x x x x . . .      own block 4..6, summary 3
      q9  . . . x . . . x x x      own block 8..9, summaries 3 and 7
    """

    name: ClassVar[str] = "fixed"
    paper: ClassVar[str] = "Child et al. 2019, Generating Long Sequences with Sparse Transformers"
    stride: int = 128
    summary: int = 8
    causal: bool = True
    prefix: int = 0

    def __post_init__(self) -> None:
        _positive(self.name, stride=self.stride, summary=self.summary)
        if self.summary > self.stride:
            raise AttentionSpecError(f"fixed: summary={self.summary} exceeds stride={self.stride}")
        if not self.causal:
            raise AttentionSpecError("fixed is defined for causal attention only (Child et al.)")
        super().__post_init__()

    def _rule(self, h: Tensor | None, q: Tensor, k: Tensor, tables: Tables) -> Tensor:
        l = self.stride  # noqa: E741 - the paper's name
        return (q // l == k // l) | (k % l >= l - self.summary)

    def _tiles(self, t: Tiles) -> Tensor:
        l = self.stride  # noqa: E741
        same_block = torch.maximum(t.qlo // l, t.klo // l) <= torch.minimum(t.qhi // l, t.khi // l)
        # the first summary position at or after klo: is it inside the key block?
        r = t.klo % l
        first = torch.where(r >= l - self.summary, t.klo, t.klo + (l - self.summary - r))
        # causal (fixed is causal only): that summary key must not come after every query
        return (same_block & t.causal()) | (first <= torch.minimum(t.khi, t.qhi))


@register_pattern
@dataclass(frozen=True)
class Longformer(Pattern):
    """A (possibly dilated) sliding window plus global positions that attend to every key
    and are attended by every query (Beltagy et al. 2020). window=3, global=[0], causal:

        k 0 1 2 3 4 5
      q0  x . . . . .
      q1  x x . . . .
      q2  x x x . . .
      q3  x x x x . .      key 0 is global: every query sees it
      q4  x . x x x .
      q5  x . . x x x

    `global_tokens` takes positions and [start, end) ranges.
    """

    name: ClassVar[str] = "longformer"
    paper: ClassVar[str] = "Beltagy et al. 2020, Longformer: The Long-Document Transformer"
    window: int = 256
    global_tokens: tuple[Any, ...] = (0,)
    dilation: int = 1
    causal: bool = False
    prefix: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "global_tokens",
            tuple(tuple(g) if isinstance(g, list) else g for g in self.global_tokens),
        )
        _ = self._window, self.globals_  # validates both
        super().__post_init__()

    @property
    def globals_(self) -> tuple[int, ...]:
        return _positions(self.name, "global_tokens", self.global_tokens)

    def validate(self, seq_len: int) -> None:
        _in_range(self.name, "global_tokens", self.globals_, seq_len, "tokens")

    @property
    def _window(self) -> Dilated:
        return Dilated(window=self.window, dilation=self.dilation, causal=self.causal)

    def _tables(self, seq_len: int | None, device: torch.device) -> Tables:
        return {"globals": _membership(self.globals_, device)}

    def _rule(self, h: Tensor | None, q: Tensor, k: Tensor, tables: Tables) -> Tensor:
        # the window inline: building the Dilated dataclass here would not trace
        reach = _dilated_reach(self.window, self.dilation, self.causal)
        window = _band(q, k, *reach, step=self.dilation)
        return window | _in(tables["globals"], q) | _in(tables["globals"], k)

    def _tiles(self, t: Tiles) -> Tensor:
        g = self.globals_
        return (
            self._window._tiles(t) | t.global_rows(g, self.causal) | t.global_cols(g, self.causal)
        )


@register_pattern
@dataclass(frozen=True)
class BigBird(BlockRule):
    """BigBird (Zaheer et al. 2020) on blocks of `block` tokens: each query block meets
    `window` neighbouring key blocks (window // 2 each side; causal: window - 1 back),
    the `global_blocks` (which also meet everything), and `random` further key blocks drawn
    per query block from a seeded hash, so a layout is reproducible. With per_head=True
    each head draws its own random blocks. block=1 token, window=3, global=[0], random=1:

        k 0 1 2 3 4 5 6 7
      q0  x x x x x x x x      global row
      q4  x . r x x x . .      window 3..5, global 0, one random block (r)
    """

    name: ClassVar[str] = "bigbird"
    paper: ClassVar[str] = "Zaheer et al. 2020, Big Bird: Transformers for Longer Sequences"
    block: int = 64
    window: int = 3
    global_blocks: tuple[int, ...] = (0,)
    random: int = 3
    seed: int = 0
    per_head: bool = False
    heads: int = 1
    causal: bool = False
    prefix: int = 0

    def __post_init__(self) -> None:
        _positive(self.name, block=self.block, window=self.window, heads=self.heads)
        if not isinstance(self.random, int) or self.random < 0:
            raise AttentionSpecError(f"bigbird: random must be >= 0, got {self.random!r}")
        object.__setattr__(self, "global_blocks", tuple(self.global_blocks))
        if any(g < 0 for g in self.global_blocks):
            raise AttentionSpecError("bigbird: global_blocks must be >= 0")
        super().__post_init__()

    @property
    def n_heads(self) -> int:
        return self.heads if self.per_head else 1

    def validate(self, seq_len: int) -> None:
        n_blocks = math.ceil(seq_len / self.block)
        _in_range(self.name, "global_blocks", self.global_blocks, n_blocks, "blocks")

    def random_blocks(self, n_blocks: int, head: int = 0) -> Tensor:
        """(N, random) the random key blocks of every query block (-1 where a row has fewer
        candidates than `random`), reproducible from the seed."""
        return _bigbird_random_table(self, n_blocks)[head if self.per_head else 0]

    def _window(self, qb: Tensor, kb: Tensor) -> Tensor:
        half = self.window // 2
        lo, hi = (-(self.window - 1), 0) if self.causal else (-half, half)
        return (kb - qb >= lo) & (kb - qb <= hi)

    def _tables(self, seq_len: int | None, device: torch.device) -> Tables:
        tables = {"globals": _membership(self.global_blocks, device)}
        if seq_len is not None:
            tables["random"] = self._draws(math.ceil(seq_len / self.block), device)
        elif not self.causal:
            raise AttentionSpecError(
                "bidirectional bigbird draws random blocks from all blocks: "
                "use mask_mod_for(seq_len)"
            )
        return tables

    def _draws(self, n_blocks: int, device: torch.device) -> Tensor:
        """(r, Hn * N) the random table, one row per draw, heads one after another."""
        table = _bigbird_random_table(self, n_blocks)  # (Hn, N, r)
        return table.permute(2, 0, 1).reshape(self.random, self.n_heads * n_blocks).to(device)

    def _block_rule(self, h: Tensor | None, qb: Tensor, kb: Tensor, tables: Tables) -> Tensor:
        allowed = self._window(qb, kb) | _in(tables["globals"], qb) | _in(tables["globals"], kb)
        if "random" in tables:
            draws = _on(tables["random"], qb)
            n_blocks = draws.shape[-1] // self.n_heads
        else:  # causal, no length (eager only): a row's draws depend only on the blocks
            # before it, so any length covering the largest query block will do
            n_blocks = int(qb.max()) + 1
            draws = self._draws(n_blocks, qb.device)
        # one flat index, not draws[h, qb]: a 0-d head tensor there becomes .item() when traced
        slot = qb.clamp(0, n_blocks - 1)
        if h is not None and self.per_head:
            slot = h.to(qb.device) * n_blocks + slot
            if self.random == 0:
                allowed = allowed & (slot >= 0)  # the head dimension the draws would give
        # a gather per draw, not (drawn == kb[..., None]).any(-1): FlexAttention's kernel
        # takes pointwise ops only
        for j in range(self.random):
            allowed = allowed | (draws[j][slot] == kb)
        return allowed


@functools.lru_cache(maxsize=64)
def _bigbird_random_table(pattern: BigBird, n_blocks: int) -> Tensor:
    """(Hn, N, r) BigBird's random key blocks: for each query block, `random` distinct blocks
    drawn from those outside its window and the globals (causal: at or before it), as the
    paper does, so every row has the same count wherever there are enough candidates; -1
    pads a row that has fewer. O(N * random * (random + window + globals)); for causal
    patterns the same at every length (`distinct_draws`)."""
    a = torch.arange(n_blocks).view(1, -1)  # (1, N) query blocks
    hi = a if pattern.causal else torch.full_like(a, n_blocks - 1)  # last candidate block
    half = pattern.window // 2
    w_lo, w_hi = (a - (pattern.window - 1), a) if pattern.causal else (a - half, a + half)
    w_lo, w_hi = w_lo.clamp(min=0), torch.minimum(w_hi, hi)
    globals_ = torch.tensor(sorted(set(pattern.global_blocks)), dtype=torch.long).view(1, 1, -1)
    outside = (globals_ < w_lo.unsqueeze(-1)) | (globals_ > w_hi.unsqueeze(-1))
    glob = torch.where(
        outside & (globals_ <= hi.unsqueeze(-1)), globals_, torch.full_like(globals_, 1 << 40)
    )  # (1, N, G) excluded globals
    window = w_lo.unsqueeze(-1) + torch.arange(pattern.window).view(1, 1, -1)
    window = torch.where(window <= w_hi.unsqueeze(-1), window, torch.full_like(window, 1 << 40))
    excluded = torch.sort(torch.cat([window, glob], dim=-1), dim=-1).values  # (1, N, E)
    count = hi + 1 - (excluded < (1 << 40)).sum(-1)  # candidates per row, (1, N)
    return distinct_draws(count, excluded, pattern.n_heads, pattern.random, pattern.seed)


def distinct_draws(count: Tensor, excluded: Tensor, n_heads: int, random: int, seed: int) -> Tensor:
    """(Hn, N, random): `random` distinct blocks for each row a of N, drawn among its
    count[0, a] candidates, the blocks from 0 up that are not among its sorted `excluded`
    blocks (1, N, E; 1 << 40 pads); -1 where a row has fewer candidates than draws.

    Draw j of row a is a 32-bit integer hash of (seed, head, a, j) (Wang/Jenkins-style
    mixing) taken modulo the candidates left, then mapped past earlier draws: the same on
    every device, and a row's draws depend only on its own candidates."""
    n_blocks = count.shape[-1]
    heads = torch.arange(n_heads).view(-1, 1)
    a = torch.arange(n_blocks).view(1, -1)  # (1, N) query blocks
    table = torch.full((n_heads, n_blocks, random), -1, dtype=torch.long)
    chosen = torch.empty(n_heads, n_blocks, 0, dtype=torch.long)  # ranks, sorted
    for j in range(random):
        x = (a * 1_000_003 + j * 7919 + heads * 104_729 + seed * 15_485_863) & 0x7FFFFFFF
        for _ in range(2):
            x = ((x >> 16) ^ x) * 0x45D9F3B & 0x7FFFFFFF
        x = (x >> 16) ^ x
        left = count - j
        rank = x % left.clamp(min=1)  # among the candidates not drawn yet
        for i in range(chosen.shape[-1]):  # skip past earlier draws, in ascending order
            rank = rank + (rank >= chosen[..., i])
        chosen = torch.sort(torch.cat([chosen, rank.unsqueeze(-1)], -1), dim=-1).values
        block = rank.clone()
        for e in range(excluded.shape[-1]):  # candidate rank -> block, skipping exclusions
            block = block + (block >= excluded[..., e])
        table[..., j] = torch.where(left > 0, block, torch.full_like(block, -1))
    return table


def _block_rule_tiles(
    rule: Callable[[Tensor, Tensor], Tensor], block: int, causal: bool, t: Tiles
) -> Tensor:
    """The exact tile layout of a rule defined on `block`-token blocks.

    The rule is evaluated on units of gcd(block, tile) tokens, where causality is exact
    (a unit pair holds a k <= q iff the key unit is not after the query unit), then each
    tile ORs the units it covers: O((S / unit)^2), independent of the token count.
    """
    unit = math.gcd(block, t.block_size)
    units = torch.arange(math.ceil(t.seq_len / unit))
    qu, ku = units.view(1, -1, 1), units.view(1, 1, -1)
    grid = rule(qu * unit // block, ku * unit // block)
    if causal:
        grid = grid & (ku <= qu)
    return _regrid(grid.expand(grid.shape[0], units.numel(), units.numel()), unit, t)


def _regrid(grid: Tensor, unit: int, t: Tiles) -> Tensor:
    """Map an (H, n, n) grid over `unit`-token blocks onto the tiles of `t`: a tile is on if
    any unit pair it covers is on."""
    if unit == t.block_size:
        return grid
    H, n, _ = grid.shape
    # prefix sums let each tile ask "any on in this rectangle?" in O(1)
    csum = torch.zeros(H, n + 1, n + 1, dtype=torch.int32)
    csum[:, 1:, 1:] = grid.int().cumsum(1).cumsum(2)
    r0, r1 = (t.qlo // unit).view(-1), (t.qhi // unit).view(-1) + 1
    c0, c1 = (t.klo // unit).view(-1), (t.khi // unit).view(-1) + 1
    total = (
        csum[:, r1][:, :, c1]
        - csum[:, r0][:, :, c1]
        - csum[:, r1][:, :, c0]
        + csum[:, r0][:, :, c0]
    )
    return total > 0


@register_pattern
@dataclass(frozen=True)
class Variable(BlockRule):
    """DeepSpeed's VariableSparsityConfig, in blocks of `block` tokens: the sequence is cut
    into consecutive local windows of `local_windows` blocks (the last size repeats); a
    query block meets the key blocks of its own window, the `global_blocks` (and the
    ranges [global_blocks[i], global_end_blocks[i]) when given), and with
    horizontal_global, global query blocks meet everything. local_windows=[2, 3],
    global=[0], block=1:

        k 0 1 2 3 4 5 6 7
      q1  x x . . . . . .      window 0..1
      q3  x . x x x . . .      window 2..4, global 0
      q6  x . . . . x x x      window 5..7, global 0
    """

    name: ClassVar[str] = "variable"
    paper: ClassVar[str] = "DeepSpeed sparse attention (VariableSparsityConfig); Child et al. 2019"
    block: int = 16
    local_windows: tuple[int, ...] = (4,)
    global_blocks: tuple[int, ...] = (0,)
    global_end_blocks: tuple[int, ...] | None = None
    horizontal_global: bool = False
    causal: bool = False
    prefix: int = 0

    def __post_init__(self) -> None:
        _positive(self.name, block=self.block)
        object.__setattr__(self, "local_windows", tuple(self.local_windows))
        object.__setattr__(self, "global_blocks", tuple(self.global_blocks))
        if not self.local_windows:
            raise AttentionSpecError("variable: local_windows needs at least one size")
        _positive(self.name, **{f"local_windows[{i}]": w for i, w in enumerate(self.local_windows)})
        if self.global_end_blocks is not None:
            ends = tuple(self.global_end_blocks)
            object.__setattr__(self, "global_end_blocks", ends)
            if len(ends) != len(self.global_blocks) or any(
                e <= s for s, e in zip(self.global_blocks, ends, strict=True)
            ):
                raise AttentionSpecError(
                    "variable: global_end_blocks must pair with global_blocks, each end > start"
                )
        if any(g < 0 for g in self.global_blocks):
            raise AttentionSpecError("variable: global_blocks must be >= 0")
        super().__post_init__()

    def _window_of(self, blocks: Tensor, tables: Tables) -> Tensor:
        """Index of the local window holding each block; the last size repeats."""
        *listed, last = self.local_windows
        listed_end = sum(listed)
        table = _on(tables["window_of"], blocks)  # blocks before listed_end, by lookup
        head = table[blocks.clamp(0, table.numel() - 1)]
        tail = len(listed) + torch.div(blocks - listed_end, last, rounding_mode="floor")
        return torch.where(blocks >= listed_end, tail, head)

    def _tables(self, seq_len: int | None, device: torch.device) -> Tables:
        *listed, _ = self.local_windows
        window_of = torch.zeros(1, dtype=torch.long)  # one size: never read, but gathered from
        if listed:  # (sum(listed),) the window of each block before the repeating size
            window_of = torch.repeat_interleave(torch.arange(len(listed)), torch.tensor(listed))
        return {
            "window_of": window_of.to(device),
            "globals": _membership(self._global_blocks(), device),
        }

    def validate(self, seq_len: int) -> None:
        n_blocks = math.ceil(seq_len / self.block)
        _in_range(self.name, "global_blocks", self._global_blocks(), n_blocks, "blocks")

    def _global_blocks(self) -> tuple[int, ...]:
        return block_ranges(self.global_blocks, self.global_end_blocks)

    def _block_rule(self, h: Tensor | None, qb: Tensor, kb: Tensor, tables: Tables) -> Tensor:
        allowed = self._window_of(qb, tables) == self._window_of(kb, tables)
        allowed = allowed | _in(tables["globals"], kb)
        if self.horizontal_global:
            allowed = allowed | _in(tables["globals"], qb)
        return allowed


@dataclass(frozen=True)
class HeadSlice(Pattern):
    """Heads [start, stop) of a pattern with per-head layouts: what one rank of a
    sequence-parallel group computes, its backend seeing the whole sequence for its own
    heads (models/parallel.py). Its layouts, rule and mask are the base pattern's for those
    heads, exactly; `head_slice` returns a shared-layout pattern unchanged."""

    name: ClassVar[str] = "head_slice"
    base: Pattern
    start: int
    stop: int

    @property
    def causal(self) -> bool:  # type: ignore[override]
        return self.base.causal

    @property
    def prefix(self) -> int:  # type: ignore[override]
        return self.base.prefix

    @property
    def is_dense(self) -> bool:
        return self.base.is_dense

    @property
    def n_heads(self) -> int:
        return self.stop - self.start

    def validate(self, seq_len: int) -> None:
        self.base.validate(seq_len)

    def _tables(self, seq_len: int | None, device: torch.device) -> Tables:
        # the first head's index as a tensor: the rule adds it to local head indices (or
        # uses it alone when one head is left and callers pass h=None), and still traces
        head0 = torch.tensor(self.start, device=device)
        return {**self.base._tables(seq_len, device), "head0": head0}

    def _rule(self, h: Tensor | None, q: Tensor, k: Tensor, tables: Tables) -> Tensor:
        head0 = _on(tables["head0"], q)
        return self.base._rule(head0 if h is None else h.to(q.device) + head0, q, k, tables)

    def _tiles(self, t: Tiles) -> Tensor:
        grid = self.base._tiles(t)
        return grid[self.start : self.stop] if grid.dim() == 3 else grid


def head_slice(pattern: Pattern, heads: slice) -> Pattern:
    """`pattern` for the heads in `heads` (a slice of range(n_heads)): itself when every head
    shares one layout."""
    if pattern.n_heads == 1:
        return pattern
    start, stop, _ = heads.indices(pattern.n_heads)
    return HeadSlice(pattern, start, stop)
