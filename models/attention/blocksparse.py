"""Block-sparse attention in plain PyTorch: forward and backward, any device, any pattern.

The sequence is cut into query blocks of `block_size` tokens. For each query block, a plan
built once per batch lists the key blocks it meets (`kv_idx`), and a token mask for the
tiles that are only partly allowed. The kernel walks (batch, head, chunk of query blocks):

    scores = Q_chunk @ K_slots^T      (c, bs, K*bs)   K slots per query block
    P      = softmax(scores + mask)   only partial tiles are masked
    O      = P @ V_slots

and its backward recomputes P chunk by chunk instead of keeping it (as FlashAttention
does), so memory is O(S * K * bs) per head, never O(S^2). What makes it fast on a CPU:
- Band layouts (sliding windows) read their key slots as a strided view of K, so nothing
  is copied; other layouts gather their key blocks once per chunk into a reused buffer.
- Every score-sized buffer is allocated once per call and reused chunk after chunk, so it
  stays in cache and never page-faults; fully allowed tiles are never masked.
- Softmax and its backward are PyTorch's fused kernels, one pass each over a chunk.

Shapes: B batch, H query heads, Hkv key/value heads, S sequence, D head dim, N query
blocks, K key slots per query block, bs block size, c query blocks per chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from models.attention.patterns import Pattern

_softmax_backward = torch.ops.aten._softmax_backward_data.out  # dS in place of dP
CHUNK_BYTES = 1 << 21  # score tile bytes per chunk: about an L2 cache


@dataclass
class BlockSparsePlan:
    """Which key blocks each query block meets, and the masks of its partial tiles."""

    block_size: int
    seq_len: int
    kv_idx: Tensor  # (Bm, Hm, N, K) long, into the key block array (padded when band)
    chunk: int  # query blocks per kernel step
    # per chunk: (first slot, end slot, (Bm, Hm, c or 1, bs, (end - first) * bs) fp32 bias,
    # -inf where disallowed, else 0) for the runs of slots where some tile of the chunk is
    # partial; full tiles are not masked. One row (broadcast) when every query block of the
    # chunk has the same mask there, as causal diagonal tiles do.
    masks: list[list[tuple[int, int, Tensor]]]
    band_lead: int | None  # band layouts: key slot s of row i is block i - lead + s
    full: Tensor  # (Bm, Hm, N, K) bool: tile fully allowed
    valid: Tensor  # (Bm, Hm, N, K) bool: slot holds a real, partly allowed tile

    @property
    def n_blocks(self) -> int:
        return self.kv_idx.shape[2]

    @property
    def slots(self) -> int:
        return self.kv_idx.shape[3]


def build_plan(
    pattern: Pattern,
    seq_len: int,
    block_size: int,
    device: torch.device | None = None,
    document_ids: Tensor | None = None,  # (B, S)
    key_padding_mask: Tensor | None = None,  # (B, S) bool, True for real tokens
    allow_band: bool = True,
) -> BlockSparsePlan:
    """The plan for one batch: analytic layout, slot lists, and partial-tile masks.

    `allow_band=False` forces explicit slot lists (FlexAttention's BlockMask needs them)."""
    bs = block_size
    n = math.ceil(seq_len / bs)
    layout = pattern.block_layout(seq_len, bs).to(device)  # (Hl, N, N)
    layout = layout.unsqueeze(0)  # (1, Hl, N, N)
    if document_ids is not None:
        layout = layout & _document_tiles(document_ids, seq_len, bs)
    band = _band(layout) if allow_band else None
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
    chunk = max(1, min(n, CHUNK_BYTES // (4 * bs * bs * width)))
    masks = []
    for c0 in range(0, n, chunk):
        rows = slice(c0, min(n, c0 + chunk))
        partial = ~full[:, :, rows].flatten(0, 2).all(dim=0)  # (K,)
        masks.append(
            [(a, b, _bias(~allowed[:, :, rows, :, a * bs : b * bs])) for a, b in _runs(partial)]
        )
    lead = band[0] if band is not None else None
    return BlockSparsePlan(bs, seq_len, kv_idx.contiguous(), chunk, masks, lead, full, valid)


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
    allowed = pattern.mask_mod_for(seq_len)(None, h, q, k)
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

    def __init__(self, plan: BlockSparsePlan, x: Tensor, chunk: int) -> None:
        bs, n, K = plan.block_size, plan.n_blocks, plan.slots
        self.bs, self.n, self.K, self.lead = bs, n, K, plan.band_lead
        D = x.shape[-1]
        self.x = x if x.shape[0] == n * bs else F.pad(x, (0, 0, 0, n * bs - x.shape[0]))
        rows = (chunk + K - 1) if self.lead is not None else chunk * K
        self.buf = x.new_empty(rows * bs, D)

    def take(self, idx: Tensor, c0: int, c1: int) -> Tensor:
        """(c, K*bs, D) slots of query blocks [c0, c1); idx (c, K)."""
        c, bs, K, D = c1 - c0, self.bs, self.K, self.x.shape[-1]
        if self.lead is None:
            out = self.buf[: c * K * bs].view(c * K, bs, D)
            torch.index_select(self.x.view(-1, bs, D), 0, idx.reshape(-1), out=out)
            return out.view(c, K * bs, D)
        first, last = c0 - self.lead, c1 - 1 - self.lead + K  # key blocks [first, last)
        if first >= 0 and last <= self.n:
            src, offset = self.x, first * bs * D
        else:  # a window runs off an end: copy the chunk's span with zero blocks around it
            src, offset = self.buf[: (last - first) * bs], 0
            src.zero_()
            lo, hi = max(first, 0), min(last, self.n)
            src[(lo - first) * bs : (hi - first) * bs] = self.x[lo * bs : hi * bs]
        return src.as_strided((c, K * bs, D), (bs * D, D, 1), src.storage_offset() + offset)


def _accumulate(
    plan: BlockSparsePlan, grad: Tensor, idx: Tensor, c0: int, c1: int, tiles: Tensor
) -> None:
    """grad (N, bs, D) += the slot gradients `tiles` (c*K, bs, D) at their key blocks."""
    if plan.band_lead is None:
        grad.index_add_(0, idx[c0:c1].reshape(-1), tiles)
        return
    rows = torch.arange(c0, c1, device=grad.device).view(-1, 1)
    blocks = (rows - plan.band_lead + torch.arange(plan.slots, device=grad.device)).reshape(-1)
    if c0 < plan.band_lead or c1 - 1 - plan.band_lead + plan.slots > grad.shape[0]:
        inside = (blocks >= 0) & (blocks < grad.shape[0])  # padding blocks take no gradient
        blocks, tiles = blocks[inside], tiles[inside]
    grad.index_add_(0, blocks, tiles)


def _apply_masks(s: Tensor, plan: BlockSparsePlan, bi: int, hi: int, c0: int) -> None:
    bs = plan.block_size
    for a, b, bias in plan.masks[c0 // plan.chunk]:
        s[..., a * bs : b * bs].add_(bias[min(bi, bias.shape[0] - 1), min(hi, bias.shape[1] - 1)])


def _blocks(x: Tensor, n: int, bs: int) -> Tensor:
    """(S, D) -> (N, bs, D) contiguous, zero-padded to N * bs rows; a copy of one head only
    where needed (a transposed or expanded input, a length not a multiple of the block)."""
    if x.shape[0] != n * bs:
        x = F.pad(x, (0, 0, 0, n * bs - x.shape[0]))
    return x.contiguous().view(n, bs, x.shape[-1])


class BlockSparseAttention(torch.autograd.Function):
    """softmax(Q K^T / sqrt(D) + mask) V over the plan's tiles, with its own backward."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan: BlockSparsePlan) -> Tensor:  # type: ignore[override]
        B, H, S, D = q.shape
        bs, n, K = plan.block_size, plan.n_blocks, plan.slots
        groups = H // k.shape[1]
        chunk = plan.chunk
        scale = 1.0 / math.sqrt(D)  # applied inside the GEMMs (baddbmm's alpha), never to Q
        out = q.new_empty(B, H, n * bs, D)
        scores = q.new_empty(chunk, bs, K * bs)
        for b in range(B):
            for h in range(H):
                bi, hi = min(b, plan.kv_idx.shape[0] - 1), min(h, plan.kv_idx.shape[1] - 1)
                idx = plan.kv_idx[bi, hi]
                keys = _Slots(plan, k[b, h // groups], chunk)
                values = _Slots(plan, v[b, h // groups], chunk)
                qh, oh = _blocks(q[b, h], n, bs), out[b, h].view(n, bs, D)
                for c0 in range(0, n, chunk):
                    c1 = min(n, c0 + chunk)
                    kg = keys.take(idx[c0:c1], c0, c1)
                    s = scores[: c1 - c0]
                    torch.baddbmm(s, qh[c0:c1], kg.transpose(1, 2), beta=0, alpha=scale, out=s)
                    _apply_masks(s, plan, bi, hi, c0)
                    torch._softmax(s, -1, False, out=s)  # in place: the row is in cache
                    # values gathered only now, so that fewer buffers compete for the cache
                    torch.bmm(s, values.take(idx[c0:c1], c0, c1), out=oh[c0:c1])
        ctx.save_for_backward(q, k, v)
        ctx.plan, ctx.chunk, ctx.seq_len = plan, chunk, S
        return out if n * bs == S else out[:, :, :S].clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        q, k, v = ctx.saved_tensors
        plan: BlockSparsePlan = ctx.plan
        chunk, S = ctx.chunk, ctx.seq_len
        B, H, _, D = q.shape
        bs, n, K = plan.block_size, plan.n_blocks, plan.slots
        groups = H // k.shape[1]
        scale = 1.0 / math.sqrt(D)
        dq = q.new_empty(B, H, n * bs, D)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        s_buf = q.new_empty(chunk, bs, K * bs)
        ds_buf = q.new_empty(chunk, bs, K * bs)
        dkv_buf = q.new_empty(chunk, K * bs, D)  # dV of the slots, then their dK
        for b in range(B):
            for kvh in range(k.shape[1]):
                # gradients accumulate per key block, in place unless S % bs needs padding
                padded = n * bs != S
                gk, gv = (
                    q.new_zeros(n, bs, D) if padded else g[b, kvh].view(n, bs, D).zero_()
                    for g in (dk, dv)
                )
                keys = _Slots(plan, k[b, kvh], chunk)
                values = _Slots(plan, v[b, kvh], chunk)
                for h in range(kvh * groups, (kvh + 1) * groups):
                    bi, hi = min(b, plan.kv_idx.shape[0] - 1), min(h, plan.kv_idx.shape[1] - 1)
                    idx = plan.kv_idx[bi, hi]
                    qh, doh = _blocks(q[b, h], n, bs), _blocks(grad_out[b, h], n, bs)
                    dqh = dq[b, h].view(n, bs, D)
                    for c0 in range(0, n, chunk):
                        c1 = min(n, c0 + chunk)
                        c = c1 - c0
                        # in an order that keeps few score- or slot-sized buffers live at once
                        kg = keys.take(idx[c0:c1], c0, c1)
                        s = s_buf[:c]
                        torch.baddbmm(s, qh[c0:c1], kg.transpose(1, 2), beta=0, alpha=scale, out=s)
                        _apply_masks(s, plan, bi, hi, c0)
                        p = torch._softmax(s, -1, False, out=s)  # recomputed, in place
                        dvg = torch.bmm(p.transpose(1, 2), doh[c0:c1], out=dkv_buf[:c])
                        _accumulate(plan, gv, idx, c0, c1, dvg.view(c * K, bs, D))
                        # dS = P * (dP - rowsum(P * dP)): softmax's own fused backward
                        vg = values.take(idx[c0:c1], c0, c1)
                        dp = torch.bmm(doh[c0:c1], vg.transpose(1, 2), out=ds_buf[:c])
                        ds = _softmax_backward(dp, p, -1, p.dtype, grad_input=dp)
                        dq_c, dkg = dqh[c0:c1], dkv_buf[:c]
                        torch.baddbmm(dq_c, ds, kg, beta=0, alpha=scale, out=dq_c)
                        torch.baddbmm(
                            dkg, ds.transpose(1, 2), qh[c0:c1], beta=0, alpha=scale, out=dkg
                        )
                        _accumulate(plan, gk, idx, c0, c1, dkg.view(c * K, bs, D))
                if padded:
                    dk[b, kvh], dv[b, kvh] = gk.view(n * bs, D)[:S], gv.view(n * bs, D)[:S]
        return dq if n * bs == S else dq[:, :, :S], dk, dv, None


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, plan: BlockSparsePlan) -> Tensor:
    """q (B, H, S, D), k and v (B, Hkv, S, D) -> (B, H, S, D); fp32 math for any dtype."""
    if q.dtype in (torch.float32, torch.float64):
        return BlockSparseAttention.apply(q, k, v, plan)
    out = BlockSparseAttention.apply(q.float(), k.float(), v.float(), plan)
    return out.to(q.dtype)
