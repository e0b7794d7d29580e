"""DeepSpeed's sparse-attention configs, block for block.

DeepSpeed (to 0.15, when sparse attention left it with its Triton 1.0 kernels) configured
block-sparse attention with a `sparse_attention` section of its JSON config: a `mode` and
parameters counted in blocks of `block` tokens. `from_deepspeed(section)` turns such a
section into a pattern whose `block_layout(S, block)` is DeepSpeed's `make_layout(S)`
block for block, for every mode and both directions; for `"unidirectional"` attention, the
blocks of DeepSpeed's layout at or below the diagonal, the only ones a causal mask keeps.

    from models.attention.deepspeed import from_deepspeed

    section = {"mode": "bigbird", "block": 16, "num_sliding_window_blocks": 3,
               "num_global_blocks": 1, "num_random_blocks": 2}
    pattern = from_deepspeed(section, heads=12)

In a job spec the same section is `attention: {pattern: deepspeed, params: {...}}`, where
the model family decides the direction of each stack (an `attention` key there must agree).

Modes (DeepSpeed's classes): `dense`, `fixed` (FixedSparsityConfig), `variable`
(VariableSparsityConfig), `bigbird` (BigBirdSparsityConfig), `bslongformer`
(BSLongformerSparsityConfig) and `local` (LocalSlidingWindowSparsityConfig, which
DeepSpeed's JSON parser never reached). Defaults are those of DeepSpeed's JSON parser:
mode `fixed`, block 16, no random blocks; `attention` defaults to `bidirectional` (`local`:
`unidirectional`), as DeepSpeed's classes do.

Random blocks: DeepSpeed draws them with Python's global `random.sample`, so its layouts
change with the interpreter's random state and no seed reproduces them. Here they come from
a seeded integer hash (`distinct_draws`, as BigBird's), from the same candidates as
DeepSpeed's (every block; causal BigBird: the blocks at or before the query block), the
same count per row, distinct within a row and free to fall on window or global blocks as
DeepSpeed's do. With `num_random_blocks: 0` the layouts are DeepSpeed's exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from models.attention.patterns import (
    AttentionSpecError,
    BlockRule,
    Pattern,
    Tables,
    Variable,
    _in,
    _membership,
    _on,
    _positive,
    block_ranges,
    distinct_draws,
    register_pattern,
)

MODES = ("dense", "fixed", "variable", "bigbird", "bslongformer", "local")
SLIDING = ("bigbird", "bslongformer", "local")  # modes with num_sliding_window_blocks
RANDOM = ("variable", "bigbird")  # modes with num_random_blocks
DIRECTIONS = ("unidirectional", "bidirectional")


@register_pattern
@dataclass(frozen=True)
class DeepSpeedSparsity(BlockRule):
    """A DeepSpeed `sparse_attention` section as a pattern; its fields are the section's
    keys, spelled as DeepSpeed's JSON spells them. `heads` and `seed` are attnpipe's: the
    model's head count (for `different_layout_per_head`) and the random blocks' seed."""

    name: ClassVar[str] = "deepspeed"
    paper: ClassVar[str] = "DeepSpeed sparse attention (SparsityConfig layouts, to 0.15)"
    mode: str = "fixed"
    block: int = 16
    different_layout_per_head: bool = False
    num_local_blocks: int = 4
    num_global_blocks: int = 1
    horizontal_global_attention: bool = False
    num_different_global_patterns: int = 1
    num_random_blocks: int = 0
    local_window_blocks: tuple[int, ...] = (4,)
    global_block_indices: tuple[int, ...] = (0,)
    global_block_end_indices: tuple[int, ...] | None = None
    num_sliding_window_blocks: int = 3
    attention: str | None = None
    heads: int = 1
    seed: int = 0
    causal: bool = False
    prefix: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise AttentionSpecError(
                f"deepspeed: mode {self.mode!r} is not one of {', '.join(MODES)}"
            )
        if self.attention is not None:
            if self.attention not in DIRECTIONS:
                raise AttentionSpecError(
                    f"deepspeed: attention {self.attention!r} is not one of {', '.join(DIRECTIONS)}"
                )
            if (self.attention == "unidirectional") != self.causal:
                stack = "causal" if self.causal else "bidirectional"
                raise AttentionSpecError(
                    f"deepspeed: attention {self.attention!r} on a {stack} stack: the model "
                    "family decides each stack's direction (drop the key)"
                )
        for key in ("local_window_blocks", "global_block_indices", "global_block_end_indices"):
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, tuple(value))
        _positive(
            self.name,
            block=self.block,
            heads=self.heads,
            num_local_blocks=self.num_local_blocks,
            num_global_blocks=self.num_global_blocks,
            num_different_global_patterns=self.num_different_global_patterns,
            num_sliding_window_blocks=self.num_sliding_window_blocks,
        )
        if not isinstance(self.num_random_blocks, int) or self.num_random_blocks < 0:
            raise AttentionSpecError(
                f"deepspeed: num_random_blocks must be >= 0, got {self.num_random_blocks!r}"
            )
        if not self.local_window_blocks:
            raise AttentionSpecError("deepspeed: local_window_blocks needs at least one size")
        sizes = {f"local_window_blocks[{i}]": w for i, w in enumerate(self.local_window_blocks)}
        _positive(self.name, **sizes)
        if any(g < 0 for g in self.global_block_indices):
            raise AttentionSpecError("deepspeed: global_block_indices must be >= 0")
        self._check_mode()
        super().__post_init__()

    def _check_mode(self) -> None:
        """DeepSpeed's own constructor checks, as one-line errors."""
        # fixed and variable modes' consecutive local windows are Variable's, without its
        # globals
        windows = (self.num_local_blocks,) if self.mode == "fixed" else self.local_window_blocks
        local = Variable(block=self.block, local_windows=windows, global_blocks=())
        object.__setattr__(self, "_local", local)  # not a field: no part of eq or hash
        if self.mode in ("fixed", "variable") and self.horizontal_global_attention and self.causal:
            raise AttentionSpecError(
                "deepspeed: horizontal_global_attention needs bidirectional attention"
            )
        if self.mode in ("variable", "bslongformer") and self.global_block_end_indices is not None:
            ends = self.global_block_end_indices
            if len(ends) != len(self.global_block_indices) or any(
                e <= s for s, e in zip(self.global_block_indices, ends, strict=True)
            ):
                raise AttentionSpecError(
                    "deepspeed: global_block_end_indices must pair with global_block_indices, "
                    "each end > its start"
                )
        if self.mode != "fixed":
            return
        L, G, P = self.num_local_blocks, self.num_global_blocks, self.num_different_global_patterns
        if L % G:
            raise AttentionSpecError(
                f"deepspeed: num_local_blocks {L} must be a multiple of num_global_blocks {G}"
            )
        if P > 1 and not self.different_layout_per_head:
            raise AttentionSpecError(
                "deepspeed: num_different_global_patterns > 1 needs different_layout_per_head"
            )
        if P > L // G:
            raise AttentionSpecError(
                f"deepspeed: num_different_global_patterns {P} is more than "
                f"num_local_blocks / num_global_blocks = {L // G}"
            )

    @property
    def n_heads(self) -> int:
        """Distinct layouts: one per head only where heads can differ (their random blocks,
        or fixed's global patterns); DeepSpeed's other per-head layouts are all the same."""
        varies = (self.mode in RANDOM and self.num_random_blocks > 0) or (
            self.mode == "fixed" and self.num_different_global_patterns > 1
        )
        return self.heads if self.different_layout_per_head and varies else 1

    def validate(self, seq_len: int) -> None:
        """DeepSpeed's checks against the length (it also wants a multiple of `block`;
        here a partial last block is a block like the others)."""
        n = math.ceil(seq_len / self.block)
        checks = {
            "num_sliding_window_blocks": (self.num_sliding_window_blocks, self.mode in SLIDING),
            "num_random_blocks": (self.num_random_blocks, self.mode in RANDOM),
            "num_global_blocks": (self.num_global_blocks, self.mode == "bigbird"),
        }
        for key, (value, applies) in checks.items():
            if applies and value > n:
                raise AttentionSpecError(
                    f"deepspeed: {key} {value} is more than the {n} blocks of {seq_len} tokens"
                )

    # -- the layout ------------------------------------------------------------------------
    def _globals(self) -> tuple[int, ...]:
        """Variable's and Longformer's global blocks (DeepSpeed skips those past the end)."""
        if self.mode == "bigbird":
            return tuple(range(self.num_global_blocks))
        return block_ranges(self.global_block_indices, self.global_block_end_indices)

    def _fixed_globals(self, n_blocks: int) -> Tensor:
        """(Hn, N) fixed mode's global blocks per head: in every whole window of L blocks,
        the G blocks ending (1 + h % P) * G - G blocks before its end; in a last, partial
        window the G blocks from the same offset, moved back to fit (DeepSpeed's
        `set_global_layout`, its Python slicing included)."""
        L, G, P = self.num_local_blocks, self.num_global_blocks, self.num_different_global_patterns
        end = n_blocks - n_blocks % L
        b = torch.arange(n_blocks)
        out = torch.zeros(self.n_heads, n_blocks, dtype=torch.bool)
        for h in range(self.n_heads):
            first = L - (1 + h % P) * G
            out[h] = (b < end) & (b % L >= first) & (b % L < first + G)
            if end < n_blocks:
                start = min(end + first, n_blocks - G)
                out[h, start : start + G] = True
        return out

    def _random(self, n_blocks: int) -> Tensor:
        """(r, Hn * N) the random blocks, one row per draw, heads one after another."""
        a = torch.arange(n_blocks).view(1, -1)
        causal_draws = self.mode == "bigbird" and self.causal  # DeepSpeed's range(0, row + 1)
        count = a + 1 if causal_draws else torch.full_like(a, n_blocks)
        none = torch.empty(1, n_blocks, 0, dtype=torch.long)
        table = distinct_draws(count, none, self.n_heads, self.num_random_blocks, self.seed)
        r = self.num_random_blocks
        return table.permute(2, 0, 1).reshape(r, self.n_heads * n_blocks)

    def _tables(self, seq_len: int | None, device: torch.device) -> Tables:
        random = self.mode in RANDOM and self.num_random_blocks > 0
        if seq_len is None and (random or self.mode == "fixed"):
            raise AttentionSpecError(
                f"deepspeed: mode {self.mode!r} lays out blocks by the sequence's length: "
                "use mask_mod_for(seq_len)"
            )
        tables: Tables = {}
        if self.mode in ("variable", "bigbird", "bslongformer"):
            tables["globals"] = _membership(self._globals(), device)
        if self.mode in ("fixed", "variable"):
            tables["window_of"] = self._local._tables(seq_len, device)["window_of"]
        if seq_len is not None:
            n_blocks = math.ceil(seq_len / self.block)
            if self.mode == "fixed":
                tables["fixed"] = self._fixed_globals(n_blocks).reshape(-1).to(device)
            if random:
                tables["random"] = self._random(n_blocks).to(device)
        return tables

    def _per_head(self, h: Tensor | None, blocks: Tensor, n_blocks: int) -> Tensor:
        """One flat index into a (heads x blocks) table: not table[h, b], since a 0-d head
        tensor there becomes .item() when traced."""
        slot = blocks.clamp(0, n_blocks - 1)
        if h is not None and self.n_heads > 1:
            slot = h.to(blocks.device) * n_blocks + slot
        return slot

    def _block_rule(self, h: Tensor | None, qb: Tensor, kb: Tensor, tables: Tables) -> Tensor:
        mode = self.mode
        if mode == "dense":
            return torch.ones_like(qb == kb)
        allowed = torch.zeros_like(qb == kb)
        if mode in SLIDING:  # W // 2 blocks on each side (causal: the mask keeps those before)
            half = self.num_sliding_window_blocks // 2
            allowed = (kb - qb >= -half) & (kb - qb <= half)
        if mode in ("fixed", "variable"):  # consecutive local windows
            allowed = self._local._window_of(qb, tables) == self._local._window_of(kb, tables)
        if "globals" in tables:  # bigbird and Longformer: rows and columns; variable: columns
            glob = tables["globals"]
            allowed = allowed | _in(glob, kb)
            if mode != "variable" or self.horizontal_global_attention:
                allowed = allowed | _in(glob, qb)
        if mode == "fixed":
            fixed = _on(tables["fixed"], qb)
            n_blocks = fixed.numel() // self.n_heads
            allowed = allowed | fixed[self._per_head(h, kb, n_blocks)]
            if self.horizontal_global_attention:
                allowed = allowed | fixed[self._per_head(h, qb, n_blocks)]
        if "random" in tables:  # a gather per draw: FlexAttention's kernel takes pointwise ops
            draws = _on(tables["random"], qb)
            slot = self._per_head(h, qb, draws.shape[-1] // self.n_heads)
            for j in range(self.num_random_blocks):
                allowed = allowed | (draws[j][slot] == kb)
        return allowed


SECTION_KEYS = tuple(
    f.name for f in fields(DeepSpeedSparsity) if f.name not in ("heads", "seed", "causal", "prefix")
)


def from_deepspeed(section: Mapping[str, Any], heads: int = 1, seed: int = 0) -> Pattern:
    """The pattern of a DeepSpeed `sparse_attention` config section (a dict as DeepSpeed's
    JSON spells it), for a layer of `heads` heads; its direction is the section's
    `attention` (DeepSpeed's default for the mode when absent)."""
    unknown = sorted(set(section) - set(SECTION_KEYS))
    if unknown:
        raise AttentionSpecError(
            f"sparse_attention.{unknown[0]}: not a DeepSpeed sparse-attention key "
            f"(known: {', '.join(SECTION_KEYS)})"
        )
    params = dict(section)
    mode = params.get("mode", "fixed")
    params.setdefault("attention", "unidirectional" if mode == "local" else "bidirectional")
    causal = params["attention"] == "unidirectional"
    return DeepSpeedSparsity(**params, heads=heads, seed=seed, causal=causal)
