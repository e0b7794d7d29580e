"""Block-sparse attention in plain PyTorch: forward and backward, any device, any pattern.

The sequence is cut into query blocks of `block_size` tokens. For each query block, a plan
built once per batch lists the key blocks it meets (`kv_idx`), and a token mask for the
tiles that are only partly allowed. The kernel walks (batch, head, chunk of query blocks):

    scores = Q_chunk @ K_slots^T      (c, bs, K*bs)   K slots per query block
    P      = softmax(scores + mask)   only partial tiles are masked
    O      = P @ V_slots

and its backward recomputes P chunk by chunk instead of keeping it (as FlashAttention
does), so memory is O(S * K * bs) per head, never O(S^2). K is the width of the ordinary
rows: a few query blocks that meet far more key blocks than the rest (the global queries
of a bidirectional BigBird or Longformer meet all of them) are not padded into every row's
width but attend all S keys in a dense pass of their own, O(S * their rows) memory.
What makes it fast on a CPU:
- Band layouts (sliding windows) read their key slots as a strided view of K, so nothing
  is copied; other layouts gather their key blocks once per chunk into a reused buffer.
  A head whose rows are not contiguous (split from the model's (B, S, H, D)) is first
  copied into a buffer that every head reuses: strided rows are slower than the copy.
- Every score-sized buffer is allocated once per call and reused chunk after chunk, so it
  stays in cache and never page-faults; fully allowed tiles are never masked.
- Softmax and its backward are PyTorch's fused kernels, one pass each over a chunk.
- On a CPU the loop over heads and steps runs in C++ (native.py, csrc/blocksparse.cpp): the
  same ops in the same order, with each core on heads of its own instead of every op forked
  over all cores; the Python loop below is the one for CUDA and for machines without a
  compiler, and the definition the C++ one follows.

Shapes: B batch, H query heads, Hkv key/value heads, S sequence, D head dim, N query
blocks, K key slots per query block, bs block size, c query blocks per chunk.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from models.attention import native
from models.attention.patterns import Pattern

_softmax_backward = torch.ops.aten._softmax_backward_data.out  # dS in place of dP
CHUNK_BYTES = 1 << 21  # score tile bytes per step of the Python loop: about an L2 cache
# the native CPU kernel's steps: each core has its own step, next to its key or value slots
NATIVE_CHUNK_BYTES = 1 << 19
# On a GPU each step launches about 6 kernels forward and 13 backward: the fewer and larger
# the steps, the less launch overhead; 64 MB of scores keeps a step's buffers small next to
# a GPU's memory. (FlexAttention is the training backend on CUDA; this is the fallback.)
CUDA_CHUNK_BYTES = 1 << 26


def chunk_bytes(device: torch.device | str | None) -> int:
    """Score bytes per kernel step on `device`."""
    if torch.device(device or "cpu").type == "cuda":
        return CUDA_CHUNK_BYTES
    return CHUNK_BYTES if native.kernel(device) is None else NATIVE_CHUNK_BYTES


@dataclass
class BlockSparsePlan:
    """Which key blocks each query block meets, and the masks of its partial tiles."""

    block_size: int
    seq_len: int
    kv_idx: Tensor  # (Bm, Hm, N, K) long, into the key block array (padded when band)
    chunk: int  # most query blocks per kernel step
    ranges: list[tuple[int, int]]  # the steps' query blocks [c0, c1): every sparse row once
    # per step: (first slot, end slot, (Bm, Hm, c or 1, bs, (end - first) * bs) fp32 bias,
    # -inf where disallowed, else 0) for the runs of slots where some tile of the step is
    # partial; full tiles are not masked. One row (broadcast) when every query block of the
    # step has the same mask there, as causal diagonal tiles do.
    masks: list[list[tuple[int, int, Tensor]]]
    band_lead: int | None  # band layouts: key slot s of row i is block i - lead + s
    full: Tensor  # (Bm, Hm, N, K) bool: tile fully allowed
    valid: Tensor  # (Bm, Hm, N, K) bool: slot holds a real, partly allowed tile
    dense: DenseRows | None = None  # query blocks that attend all keys in a pass of their own
    _steps: dict[tuple[int, int], list[_Step]] = field(default_factory=dict, repr=False)
    _table: object | None = field(default=None, repr=False)  # the native kernel's steps

    @property
    def n_blocks(self) -> int:
        return self.kv_idx.shape[2]

    @property
    def slots(self) -> int:
        return self.kv_idx.shape[3]

    def steps(self, b: int, h: int) -> list[_Step]:
        """The kernel's steps for batch row b and head h, built once per plan: every index and
        mask view a step needs, so that the kernel's loop only computes."""
        bi, hi = _broadcast_index(self.kv_idx, b, h)
        if (bi, hi) not in self._steps:
            self._steps[bi, hi] = _build_steps(self, bi, hi)
        return self._steps[bi, hi]

    def step_table(self, kernel) -> object:
        """Every (batch row, head)'s steps, handed to the native kernel once per plan."""
        if self._table is None:
            Bm, Hm = self.kv_idx.shape[:2]
            lead = -1 if self.band_lead is None else self.band_lead
            steps = [
                [kernel.Step(*step) for step in self.steps(b, h)]
                for b in range(Bm)
                for h in range(Hm)
            ]
            self._table = kernel.StepTable(
                Bm, Hm, self.block_size, self.slots, lead, self.chunk, steps
            )
        return self._table


def _broadcast_index(t: Tensor, b: int, h: int) -> tuple[int, int]:
    """Index of batch row b and head h in t (Bm, Hm, ...), where Bm and Hm are 1 when every
    batch row or every head shares it."""
    return min(b, t.shape[0] - 1), min(h, t.shape[1] - 1)


@dataclass
class DenseRows:
    """Query tokens of the blocks too wide for the kernel's slots, attended against every key."""

    rows: Tensor  # (R,) long, query positions below seq_len
    bias: Tensor | None  # (Bm, Hm, R, S) fp32, -inf where disallowed; None: all allowed
    chunk: int  # rows per step

    def bias_for(self, b: int, h: int, r0: int, r1: int) -> Tensor | None:
        if self.bias is None:
            return None
        return self.bias[(*_broadcast_index(self.bias, b, h), slice(r0, r1))]


class _Step(NamedTuple):
    """Query blocks [c0, c1) of one (batch, head): their key blocks, their masks, and the key
    blocks their slot gradients go to."""

    c0: int
    c1: int
    idx: Tensor  # ((c1 - c0) * K,) key block of each slot, row by row
    masks: list[tuple[int, int, Tensor]]  # (first column, end column, additive bias)
    dest: Tensor  # key block that each kept slot's gradient is added to
    keep: Tensor | None  # slots whose gradient is kept (band slots past either end are not)


def build_plan(
    pattern: Pattern,
    seq_len: int,
    block_size: int,
    device: torch.device | None = None,
    document_ids: Tensor | None = None,  # (B, S)
    key_padding_mask: Tensor | None = None,  # (B, S) bool, True for real tokens
) -> BlockSparsePlan:
    """The plan for one batch: analytic layout, slot lists, and partial-tile masks."""
    bs = block_size
    n = math.ceil(seq_len / bs)
    layout = pattern.block_layout(seq_len, bs).to(device)  # (Hl, N, N)
    layout = layout.unsqueeze(0)  # (1, Hl, N, N)
    if document_ids is not None:
        layout = layout & _document_tiles(document_ids, seq_len, bs)
    heavy = _wide_rows(layout)
    if heavy is not None:  # the slots leave these rows empty: the dense pass computes them
        layout = layout & ~heavy.view(1, 1, n, 1)
    band = _band(layout)
    if band is not None:
        lead, width = band
        rows = torch.arange(n, device=device).view(1, 1, n, 1)
        kv_idx = (rows + torch.arange(width, device=device)).expand(*layout.shape[:2], n, width)
        kpos_block = kv_idx - lead  # block index in the unpadded sequence
    else:
        counts = layout.sum(-1)
        width = max(int(counts.max()), 1)
        # slots in ascending key-block order; rows with fewer blocks pad with block 0
        order = torch.argsort((~layout).to(torch.int8), dim=-1, stable=True)[..., :width]
        present = torch.gather(layout, -1, order)
        kv_idx = torch.where(present, order, torch.zeros_like(order))
        kpos_block = torch.where(present, order, torch.full_like(order, -1))
    allowed = _slot_mask(
        pattern, seq_len, bs, kpos_block, device, document_ids, key_padding_mask
    )  # (Bm, Hm, N, bs, K*bs)
    Bm, Hm = allowed.shape[:2]
    tiles = allowed.view(Bm, Hm, n, bs, width, bs)
    full = tiles.all(dim=5).all(dim=3)  # (Bm, Hm, N, K)
    valid = tiles.any(dim=5).any(dim=3)
    kv_idx = kv_idx.expand(Bm, Hm, n, width)
    if band is None:
        # full tiles first, so that the partial ones share one masked run of slots
        order = torch.argsort((~full).to(torch.int8), dim=-1, stable=True)
        kv_idx = torch.gather(kv_idx, -1, order)
        full, valid = torch.gather(full, -1, order), torch.gather(valid, -1, order)
        cols = (order.unsqueeze(-1) * bs + torch.arange(bs, device=device)).flatten(-2)
        allowed = torch.gather(allowed, -1, cols.unsqueeze(3).expand_as(allowed))
    # Rows with nothing allowed (padding queries past seq_len, or all-padding keys) attend
    # every slot: finite, and never read; -inf everywhere would give NaN gradients.
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    chunk = max(1, min(n, chunk_bytes(device) // (4 * bs * bs * width)))
    sparse = torch.ones(n, dtype=torch.bool) if heavy is None else ~heavy.cpu()
    ranges = [(c0, min(b, c0 + chunk)) for a, b in _runs(sparse) for c0 in range(a, b, chunk)]
    masks = []
    for c0, c1 in ranges:
        partial = ~full[:, :, c0:c1].flatten(0, 2).all(dim=0)  # (K,)
        masks.append(
            [(a, b, _bias(~allowed[:, :, c0:c1, :, a * bs : b * bs])) for a, b in _runs(partial)]
        )
    lead = band[0] if band is not None else None
    dense = None
    if heavy is not None:
        dense = _dense_rows(pattern, seq_len, bs, heavy, device, document_ids, key_padding_mask)
    return BlockSparsePlan(
        bs, seq_len, kv_idx.contiguous(), chunk, ranges, masks, lead, full, valid, dense
    )


def _wide_rows(layout: Tensor) -> Tensor | None:
    """(N,) bool: query blocks that meet so many more key blocks than the others (global
    queries) that padding every row to their width would cost more than a dense pass over
    them; None when there are none.

    The width w minimises (rows that fit) * w + (rows that do not) * N tiles, over the widths
    where the rows left out are outliers: each meets more than 2w key blocks, and there are
    at most N / 16 of them, so the dense pass stays O(S * S / 16) at the very worst."""
    n = layout.shape[-1]
    counts = layout.sum(-1).flatten(0, -2).amax(dim=0)  # (N,) widest over batch and heads
    widths = torch.unique(counts)  # ascending
    wide = (counts.view(1, -1) > widths.view(-1, 1)).sum(-1)  # rows left out at each width
    gap = torch.cat([widths[1:], widths[-1:]]) > 2 * widths  # next width is an outlier
    ok = (wide == 0) | (gap & (wide <= max(1, n // 16)))
    cost = torch.where(ok, (n - wide) * widths + wide * n, torch.iinfo(torch.int64).max)
    w = widths[int(torch.argmin(cost))]
    heavy = counts > w
    return heavy if bool(heavy.any()) else None


def _dense_rows(
    pattern: Pattern,
    seq_len: int,
    bs: int,
    heavy: Tensor,  # (N,) bool
    device: torch.device | None,
    document_ids: Tensor | None,
    key_padding_mask: Tensor | None,
) -> DenseRows:
    """The wide query blocks' tokens and their exact token rule against all keys."""
    rows = (heavy.nonzero().view(-1, 1) * bs + torch.arange(bs, device=heavy.device)).view(-1)
    rows = rows[rows < seq_len].to(device)
    q = rows.view(1, 1, -1, 1)
    k = torch.arange(seq_len, device=device).view(1, 1, 1, -1)
    h = torch.arange(pattern.n_heads, device=device).view(1, -1, 1, 1)
    rule = pattern.mask_mod_for(seq_len, device=device)
    allowed = rule(None, h if pattern.n_heads > 1 else None, q, k)
    if document_ids is not None:
        allowed = allowed & (document_ids[:, None, rows, None] == document_ids[:, None, None, :])
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)  # as in the slots: finite, unread
    bias = None
    if not bool(allowed.all()):
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=device)
        bias.masked_fill_(~allowed, float("-inf"))
    on_gpu = torch.device(device or "cpu").type == "cuda"  # the dense pass is Python's loop
    chunk = max(1, (CUDA_CHUNK_BYTES if on_gpu else CHUNK_BYTES) // (4 * seq_len))
    return DenseRows(rows, bias, chunk)


def _bias(disallowed: Tensor) -> Tensor:
    """An additive fp32 mask (adding costs a seventh of a masked fill on a CPU), one row of
    query blocks when all rows are the same."""
    if bool((disallowed == disallowed[:, :, :1]).all()):
        disallowed = disallowed[:, :, :1]
    bias = torch.zeros(disallowed.shape, dtype=torch.float32, device=disallowed.device)
    return bias.masked_fill_(disallowed, float("-inf"))


def _band(layout: Tensor) -> tuple[int, int] | None:
    """(lead, width) when every row i of a shared layout lies in blocks [i - lead, i - lead +
    width) and the band is as narrow as the widest row: then no slot is wasted."""
    if layout.shape[0] != 1 or layout.shape[1] != 1:
        return None
    grid = layout[0, 0]
    n = grid.shape[0]
    rows, cols = grid.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return None
    offsets = cols - rows
    lo, hi = int(offsets.min()), int(offsets.max())
    width = hi - lo + 1
    if width > int(grid.sum(-1).max()) or width >= n:
        return None
    return -lo, width


def _document_tiles(doc: Tensor, seq_len: int, bs: int) -> Tensor:
    """(B, 1, N, N): tiles whose query and key document ranges overlap (packed, sorted ids)."""
    n = math.ceil(seq_len / bs)
    padded = F.pad(doc, (0, n * bs - seq_len), value=-1)
    padded[:, seq_len:] = doc[:, -1:].expand(-1, n * bs - seq_len)
    blocks = padded.view(doc.shape[0], n, bs)
    first, last = blocks[..., 0], blocks[..., -1]  # document ids only grow along a sequence
    return ((first[:, :, None] <= last[:, None, :]) & (first[:, None, :] <= last[:, :, None]))[
        :, None
    ]


def _slot_mask(
    pattern: Pattern,
    seq_len: int,
    bs: int,
    kpos_block: Tensor,  # (Bl, Hl, N, K) key block of each slot, -1 for none
    device: torch.device | None,
    document_ids: Tensor | None,
    key_padding_mask: Tensor | None,
) -> Tensor:
    """(Bm, Hm, N, bs, K*bs) the exact token rule on every slot's tile."""
    n = kpos_block.shape[2]
    q = torch.arange(n * bs, device=device).view(1, 1, n, bs, 1)
    k = (kpos_block.unsqueeze(-1) * bs + torch.arange(bs, device=device)).flatten(-2)
    k = k.unsqueeze(3)  # (Bl, Hl, N, 1, K*bs)
    heads = torch.arange(pattern.n_heads, device=device).view(1, -1, 1, 1, 1)
    h = heads if pattern.n_heads > 1 else None
    allowed = pattern.mask_mod_for(seq_len, device=device)(None, h, q, k)
    allowed = allowed & (k >= 0) & (k < seq_len)  # a slot of block -1 has k < 0
    if document_ids is not None or key_padding_mask is not None:
        B = (document_ids if document_ids is not None else key_padding_mask).shape[0]
        kk = k.clamp(0, seq_len - 1).expand(B, *k.shape[1:])
        if document_ids is not None:
            doc = F.pad(document_ids, (0, n * bs - seq_len), value=-1)
            qdoc = doc.view(B, 1, n, bs, 1)
            kdoc = torch.gather(
                document_ids.view(B, 1, 1, 1, -1).expand(*kk.shape[:-1], -1), -1, kk
            )
            allowed = allowed & (qdoc == kdoc)
        if key_padding_mask is not None:
            keep = key_padding_mask.view(B, 1, 1, 1, -1).expand(*kk.shape[:-1], -1)
            allowed = allowed & torch.gather(keep, -1, kk)
    while allowed.dim() < 5:
        allowed = allowed.unsqueeze(0)
    return allowed


def _runs(flags: Tensor) -> list[tuple[int, int]]:
    """[start, stop) runs of True."""
    runs, start = [], None
    for i, f in enumerate([*flags.tolist(), False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            runs.append((start, i))
            start = None
    return runs


class _Slots:
    """Key (or value) slots of one (batch, kv head): a strided view of the sequence itself for
    bands (a small zero-padded copy only where a window runs off either end), else a gather
    into a reused buffer."""

    def __init__(
        self, plan: BlockSparsePlan, like: Tensor, chunk: int, buf: Tensor | None = None
    ) -> None:
        """One buffer for every head of a call (a fresh one per head would page-fault), or
        `buf`, (chunk * K * bs, D), when the caller has one free while slots are in use."""
        bs, n, K = plan.block_size, plan.n_blocks, plan.slots
        self.bs, self.n, self.K, self.lead = bs, n, K, plan.band_lead
        rows = (chunk + K - 1) if self.lead is not None else chunk * K
        self.buf = like.new_empty(rows * bs, like.shape[-1]) if buf is None else buf
        self._views: dict[int, tuple[Tensor, Tensor]] = {}  # c -> (gather target, slots)
        self.rows = _Blocks(n, bs)

    def of(self, x: Tensor) -> _Slots:
        """Take slots from x (S, D), one head's keys or values, from now on."""
        self.blocks = self.rows.of(x)  # contiguous rows, zero-padded to N blocks
        self.x = self.blocks.view(self.n * self.bs, x.shape[-1])
        return self

    def take(self, step: _Step) -> Tensor:
        """(c, K*bs, D) slots of the step's query blocks."""
        c0, c1 = step.c0, step.c1
        c, bs, K, D = c1 - c0, self.bs, self.K, self.x.shape[-1]
        if self.lead is None:
            if c not in self._views:
                out = self.buf[: c * K * bs].view(c * K, bs, D)
                self._views[c] = out, out.view(c, K * bs, D)
            out, slots = self._views[c]
            torch.index_select(self.blocks, 0, step.idx, out=out)
            return slots
        first, last = c0 - self.lead, c1 - 1 - self.lead + K  # key blocks [first, last)
        if first >= 0 and last <= self.n:
            src, offset = self.x, first * bs
        else:  # a window runs off an end: copy the chunk's span with zero blocks around it
            src, offset = self.buf[: (last - first) * bs], 0
            src.zero_()
            lo, hi = max(first, 0), min(last, self.n)
            src[(lo - first) * bs : (hi - first) * bs] = self.x[lo * bs : hi * bs]
        return src.as_strided((c, K * bs, D), (bs * D, D, 1), src.storage_offset() + offset * D)


def _build_steps(plan: BlockSparsePlan, bi: int, hi: int) -> list[_Step]:
    bs, n, K = plan.block_size, plan.n_blocks, plan.slots
    idx = plan.kv_idx[bi, hi]
    steps = []
    for (c0, c1), chunk_masks in zip(plan.ranges, plan.masks, strict=True):
        masks = [
            (a * bs, b * bs, bias[_broadcast_index(bias, bi, hi)]) for a, b, bias in chunk_masks
        ]
        flat, keep = idx[c0:c1].reshape(-1), None
        dest = flat
        if plan.band_lead is not None:
            rows = torch.arange(c0, c1, device=idx.device).view(-1, 1)
            dest = (rows - plan.band_lead + torch.arange(K, device=idx.device)).reshape(-1)
            if c0 < plan.band_lead or c1 - 1 - plan.band_lead + K > n:
                keep = ((dest >= 0) & (dest < n)).nonzero().view(-1)  # padding takes no gradient
                dest = dest[keep]
        steps.append(_Step(c0, c1, flat, masks, dest, keep))
    return steps


def _accumulate(grad: Tensor, step: _Step, tiles: Tensor) -> None:
    """grad (N, bs, D) += the slot gradients `tiles` (c*K, bs, D) at their key blocks."""
    grad.index_add_(0, step.dest, tiles if step.keep is None else tiles.index_select(0, step.keep))


def _apply_masks(s: Tensor, step: _Step) -> None:
    for lo, hi, bias in step.masks:
        s[..., lo:hi].add_(bias)


class _Blocks:
    """One head's rows (S, D) as blocks (N, bs, D): a view of the input when its rows are
    contiguous, else a copy into one zero-padded buffer that every head of a call reuses (a
    head split from (B, S, H, D), an expanded gradient, a length that is not a multiple of
    the block). Strided rows cost more than the copy: BigBird at 16K tokens with heads split
    from (B, S, H, D) took 733 ms fwd+bwd read in place, 466 ms copied head by head."""

    def __init__(self, n: int, bs: int) -> None:
        self.n, self.bs = n, bs
        self.buf: Tensor | None = None

    def of(self, x: Tensor) -> Tensor:
        (S, D), n, bs = x.shape, self.n, self.bs
        if n * bs == S and x.stride(1) == 1 and x.stride(0) == D:
            return x.view(n, bs, D)
        if self.buf is None:
            self.buf = x.new_zeros(n * bs, D)
        self.buf[:S].copy_(x)
        return self.buf.view(n, bs, D)


class BlockSparseAttention(torch.autograd.Function):
    """softmax(Q K^T / sqrt(D) + mask) V over the plan's tiles, with its own backward."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan: BlockSparsePlan) -> Tensor:  # type: ignore[override]
        B, H, S, D = q.shape
        bs, n = plan.block_size, plan.n_blocks
        scale = 1.0 / math.sqrt(D)  # applied inside the GEMMs (baddbmm's alpha), never to Q
        out = q.new_empty(B, H, n * bs, D)
        kernel = _native_loop(q, B * H)
        if kernel is not None:
            kernel.forward(q, k, v, out, plan.step_table(kernel), scale)
        else:
            BlockSparseAttention._forward_loop(q, k, v, out, plan)
        _DensePass(plan.dense, q, scale).forward_heads(q, k, v, out)  # the rows left out
        ctx.save_for_backward(q, k, v)
        ctx.plan, ctx.seq_len = plan, S
        return out if n * bs == S else out[:, :, :S].clone()

    @staticmethod
    def _forward_loop(q: Tensor, k: Tensor, v: Tensor, out: Tensor, plan: BlockSparsePlan) -> None:
        """The kernel's loop in Python: every op on every core, one after the other."""
        B, H, _, D = q.shape
        bs, n, K = plan.block_size, plan.n_blocks, plan.slots
        groups = H // k.shape[1]
        chunk = plan.chunk
        scale = 1.0 / math.sqrt(D)
        scores = q.new_empty(chunk, bs, K * bs)
        key_slots = _Slots(plan, k, chunk)
        value_slots = _Slots(plan, v, chunk, buf=key_slots.buf)  # keys are done with by then
        queries = _Blocks(n, bs)
        for b in range(B):
            for h in range(H):
                kvh = h // groups
                keys, values = key_slots.of(k[b, kvh]), value_slots.of(v[b, kvh])
                qh, oh = queries.of(q[b, h]), out[b, h].view(n, bs, D)
                for step in plan.steps(b, h):
                    q_c, c = qh[step.c0 : step.c1], step.c1 - step.c0
                    s = scores if c == chunk else scores[:c]
                    torch.baddbmm(s, q_c, keys.take(step).mT, beta=0, alpha=scale, out=s)
                    _apply_masks(s, step)
                    torch._softmax(s, -1, False, out=s)  # in place: the row is in cache
                    # values gathered only now, so that fewer buffers compete for the cache
                    torch.bmm(s, values.take(step), out=oh[step.c0 : step.c1])

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        q, k, v = ctx.saved_tensors
        plan: BlockSparsePlan = ctx.plan
        S = ctx.seq_len
        B, H, _, D = q.shape
        bs, n = plan.block_size, plan.n_blocks
        scale = 1.0 / math.sqrt(D)
        dq = q.new_empty(B, H, n * bs, D)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        kernel = _native_loop(q, B * k.shape[1])
        if kernel is not None:
            kernel.backward(q, k, v, grad_out, dq, dk, dv, plan.step_table(kernel), scale)
        else:
            BlockSparseAttention._backward_loop(q, k, v, grad_out, (dq, dk, dv), plan)
        dense = _DensePass(plan.dense, q, scale)  # the rows left out
        dense.backward_heads((q, k, v, grad_out), (dq, dk, dv))
        return dq if n * bs == S else dq[:, :, :S], dk, dv, None

    @staticmethod
    def _backward_loop(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        grad_out: Tensor,
        grads: tuple[Tensor, Tensor, Tensor],
        plan: BlockSparsePlan,
    ) -> None:
        """dq (B, H, N*bs, D), dk and dv of the Python loop."""
        dq, dk, dv = grads
        B, H, S, D = q.shape
        bs, n, K = plan.block_size, plan.n_blocks, plan.slots
        groups = H // k.shape[1]
        chunk = plan.chunk
        scale = 1.0 / math.sqrt(D)
        s_buf = q.new_empty(chunk, bs, K * bs)
        ds_buf = q.new_empty(chunk, bs, K * bs)
        dkv_buf = q.new_empty(chunk, K * bs, D)  # dV of the slots, then V's slots, then dK
        key_slots = _Slots(plan, k, chunk)
        value_slots = _Slots(plan, v, chunk, buf=dkv_buf.view(-1, D))
        queries, grad_rows = _Blocks(n, bs), _Blocks(n, bs)
        scratch: list[Tensor] = []  # accumulators when dK, dV rows cannot take them in place
        for b in range(B):
            for kvh in range(k.shape[1]):
                # gradients accumulate per key block, in place when the rows are contiguous
                in_place = n * bs == S and dk[b, kvh].stride(0) == D == dv[b, kvh].stride(0)
                if in_place:
                    gk, gv = (g[b, kvh].view(n, bs, D).zero_() for g in (dk, dv))
                else:
                    scratch = scratch or [q.new_empty(n, bs, D) for _ in range(2)]
                    gk, gv = (g.zero_() for g in scratch)
                keys, values = key_slots.of(k[b, kvh]), value_slots.of(v[b, kvh])
                for h in range(kvh * groups, (kvh + 1) * groups):
                    qh, doh = queries.of(q[b, h]), grad_rows.of(grad_out[b, h])
                    dqh = dq[b, h].view(n, bs, D)
                    for step in plan.steps(b, h):
                        c0, c1 = step.c0, step.c1
                        q_c, do_c, dq_c, c = qh[c0:c1], doh[c0:c1], dqh[c0:c1], c1 - c0
                        s, ds, dkv = (x if c == chunk else x[:c] for x in (s_buf, ds_buf, dkv_buf))
                        dkv_tiles = dkv.view(c * K, bs, D)
                        # in an order that keeps few score- or slot-sized buffers live at once
                        kg = keys.take(step)
                        torch.baddbmm(s, q_c, kg.mT, beta=0, alpha=scale, out=s)
                        _apply_masks(s, step)
                        p = torch._softmax(s, -1, False, out=s)  # recomputed, in place
                        torch.bmm(p.mT, do_c, out=dkv)  # dV of the slots
                        _accumulate(gv, step, dkv_tiles)
                        # dS = P * (dP - rowsum(P * dP)): softmax's own fused backward
                        torch.bmm(do_c, values.take(step).mT, out=ds)
                        _softmax_backward(ds, p, -1, p.dtype, grad_input=ds)
                        torch.baddbmm(dq_c, ds, kg, beta=0, alpha=scale, out=dq_c)
                        torch.baddbmm(dkv, ds.mT, q_c, beta=0, alpha=scale, out=dkv)  # dK
                        _accumulate(gk, step, dkv_tiles)
                if not in_place:
                    dk[b, kvh], dv[b, kvh] = gk.view(n * bs, D)[:S], gv.view(n * bs, D)[:S]


def _native_loop(q: Tensor, tasks: int):
    """The compiled loop, when there is one for q's device and at least one (batch, head)
    task per core for it to run side by side (else the Python loop's ops use all cores)."""
    return native.kernel(q.device) if tasks >= torch.get_num_threads() else None


class _DensePass:
    """The plan's wide query rows against all S keys of one head: plain masked softmax
    attention, a few rows at a time, in buffers that every head of a call reuses."""

    def __init__(self, dense: DenseRows | None, like: Tensor, scale: float) -> None:
        self.dense, self.scale = dense, scale
        if dense is not None:
            S, D, rows = like.shape[2], like.shape[3], min(dense.chunk, len(dense.rows))
            self.s, self.ds = like.new_empty(rows, S), like.new_empty(rows, S)
            self.small = like.new_empty(rows, D)

    def forward_heads(self, q: Tensor, k: Tensor, v: Tensor, out: Tensor) -> None:
        """forward() for every (batch row, head), after a loop that left the wide rows out."""
        if self.dense is None:
            return
        B, H = q.shape[:2]
        groups = H // k.shape[1]
        for b, h in itertools.product(range(B), range(H)):
            self.forward(b, h, q[b, h], k[b, h // groups], v[b, h // groups], out[b, h])

    def backward_heads(self, inputs: tuple[Tensor, ...], grads: tuple[Tensor, ...]) -> None:
        """backward() for every (batch row, head): inputs (q, k, v, grad_out), grads (dq, dk,
        dv) as the autograd function has them, all but the wide rows computed."""
        if self.dense is None:
            return
        q, k, v, grad_out = inputs
        dq, dk, dv = grads
        B, H = q.shape[:2]
        groups = H // k.shape[1]
        for b, h in itertools.product(range(B), range(H)):
            kvh = h // groups
            head_inputs = (q[b, h], k[b, kvh], v[b, kvh], grad_out[b, h])
            self.backward(b, h, head_inputs, (dq[b, h], dk[b, kvh], dv[b, kvh]))

    def _scores(self, b: int, h: int, r0: int, r1: int, q_r: Tensor, k: Tensor) -> Tensor:
        s, bias = self.s[: r1 - r0], self.dense.bias_for(b, h, r0, r1)  # type: ignore[union-attr]
        if bias is None:
            torch.addmm(s, q_r, k.mT, beta=0, alpha=self.scale, out=s)
        else:  # the mask is added by the GEMM itself
            torch.addmm(bias.to(s.dtype), q_r, k.mT, alpha=self.scale, out=s)
        return torch._softmax(s, -1, False, out=s)

    def forward(self, b: int, h: int, q: Tensor, k: Tensor, v: Tensor, out: Tensor) -> None:
        """out (N*bs, D) rows of the dense rows from q, k, v (S, D) of one head."""
        if self.dense is None:
            return
        rows_all = self.dense.rows
        for r0 in range(0, len(rows_all), self.dense.chunk):
            rows = rows_all[r0 : r0 + self.dense.chunk]
            p = self._scores(b, h, r0, r0 + len(rows), q.index_select(0, rows), k)
            out.index_copy_(0, rows, torch.mm(p, v, out=self.small[: len(rows)]))

    def backward(
        self, b: int, h: int, inputs: tuple[Tensor, ...], grads: tuple[Tensor, Tensor, Tensor]
    ) -> None:
        """dq's dense rows are written; dk and dv (S, D) accumulate their part."""
        if self.dense is None:
            return
        q, k, v, grad_out = inputs
        dq, dk, dv = grads
        rows_all = self.dense.rows
        for r0 in range(0, len(rows_all), self.dense.chunk):
            rows = rows_all[r0 : r0 + self.dense.chunk]
            r = len(rows)
            q_r, do_r = q.index_select(0, rows), grad_out.index_select(0, rows)
            p = self._scores(b, h, r0, r0 + r, q_r, k)
            dv.addmm_(p.mT, do_r)
            ds = torch.mm(do_r, v.mT, out=self.ds[:r])
            _softmax_backward(ds, p, -1, p.dtype, grad_input=ds)
            dq_r = torch.addmm(self.small[:r], ds, k, beta=0, alpha=self.scale, out=self.small[:r])
            dq.index_copy_(0, rows, dq_r)
            dk.addmm_(ds.mT, q_r, alpha=self.scale)


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, plan: BlockSparsePlan) -> Tensor:
    """q (B, H, S, D), k and v (B, Hkv, S, D) -> (B, H, S, D); fp32 math for any dtype."""
    if q.dtype in (torch.float32, torch.float64):
        return BlockSparseAttention.apply(q, k, v, plan)
    out = BlockSparseAttention.apply(q.float(), k.float(), v.float(), plan)
    return out.to(q.dtype)
