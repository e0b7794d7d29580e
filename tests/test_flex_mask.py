"""FlexAttention's BlockMask (models.attention.backends.FlexLayout): exact tiles built on
the device from the pattern's layout, documents and padding; reused when a batch has
neither; no host sync per batch; and a tile size that every torch 2.13 CUDA default config
of flex's forward and backward divides."""

from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from models.attention import make_pattern
from models.attention.backends import FLEX_BLOCK, BatchGeometry, make_backend

S = 600  # five 128-token tiles, the last one ragged
PATTERNS = [
    ("dense", {}, True),
    ("sliding_window", {"window": 300}, True),
    ("sliding_window", {"window": 40}, True),
    ("dilated", {"window": 40, "dilation": 3}, True),
    ("strided", {"stride": 50}, False),
    ("fixed", {"stride": 128, "summary": 8}, False),
    ("longformer", {"window": 200, "global_tokens": [0, [300, 310]]}, True),
    ("bigbird", {"block": 64, "window": 3, "global_blocks": [0], "random": 2, "seed": 1}, True),
    ("bigbird", {"block": 32, "window": 3, "random": 1, "per_head": True, "heads": 4}, True),
    ("variable", {"block": 64, "local_windows": [2, 3], "global_blocks": [1]}, True),
    ("dense", {"prefix": 200}, False),
    ("deepspeed", {"mode": "bslongformer", "block": 32, "global_block_indices": [0, 9]}, True),
]
CASES = [
    pytest.param(name, params, causal, id=f"{name}-{i}-{'causal' if causal else 'bidir'}")
    for i, (name, params, bidir) in enumerate(PATTERNS)
    for causal in ([True, False] if bidir else [True])
]


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two packed rows: row 0 three documents (one spans whole tiles), row 1 one document
    and padding from token 420 (a padding document id, as the shards write)."""
    docs = torch.tensor([[0] * 290 + [1] * 200 + [2] * 110, [0] * 420 + [9] * 180])
    keep = torch.ones(2, S, dtype=torch.bool)
    keep[1, 420:] = False
    return docs, keep


def dense_tiles(kv_num: torch.Tensor, kv_idx: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, N, N) bool from BlockMask's (count, indices) form."""
    out = torch.zeros(*kv_idx.shape[:-1], n, dtype=torch.bool)
    for index in torch.cartesian_prod(*(torch.arange(s) for s in kv_num.shape)):
        i = tuple(index.tolist())
        out[i][kv_idx[i][: kv_num[i]].long()] = True
    return out


def exact_tiles(allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, N, N) tiles with any allowed pair, and tiles whose every pair is allowed and
    that lie wholly inside the sequence (flex bounds a ragged tile itself)."""
    n = math.ceil(S / FLEX_BLOCK)
    pad = n * FLEX_BLOCK - S
    grid = torch.nn.functional.pad(allowed, (0, pad, 0, pad))
    tiles = grid.view(*grid.shape[:2], n, FLEX_BLOCK, n, FLEX_BLOCK).transpose(3, 4)
    inside = torch.arange(n) < S // FLEX_BLOCK
    full = tiles.flatten(-2).all(-1) & inside[:, None] & inside[None, :]
    return tiles.flatten(-2).any(-1), full


@pytest.mark.parametrize("batch_has", ["documents+padding", "padding", "nothing"])
@pytest.mark.parametrize("name,params,causal", CASES)
def test_flex_block_mask_is_exact_with_documents_and_padding(name, params, causal, batch_has):
    pattern = make_pattern(name, causal=causal, **params)
    backend = make_backend("flex", pattern, 64)
    docs, keep = batch()
    docs = docs if "documents" in batch_has else None
    keep = keep if "padding" in batch_has else None
    geo = BatchGeometry(S, S, key_padding_mask=keep, document_ids=docs, device=torch.device("cpu"))
    mask = backend.prepare(geo, torch.float32)
    allowed = pattern.dense_mask(S)[None]  # (B|1, H|1, S, S)
    if docs is not None:
        allowed = allowed & (docs[:, None, :, None] == docs[:, None, None, :])
    if keep is not None:
        allowed = allowed & keep[:, None, None, :]
    any_pair, full = exact_tiles(allowed)
    n = math.ceil(S / FLEX_BLOCK)
    got_full = dense_tiles(mask.full_kv_num_blocks, mask.full_kv_indices, n)
    got_partial = dense_tiles(mask.kv_num_blocks, mask.kv_indices, n)
    assert mask.BLOCK_SIZE == (FLEX_BLOCK, FLEX_BLOCK)
    assert torch.equal(got_full, full.expand_as(got_full))  # full exactly where all pairs are
    assert not (got_full & got_partial).any()
    assert ((got_full | got_partial) >= any_pair).all()  # no allowed pair is skipped
    # mask_mod is the token rule: the dense mask flex evaluates equals the reference
    q = torch.arange(S).view(1, 1, -1, 1)
    k = torch.arange(S).view(1, 1, 1, -1)
    heads = torch.arange(pattern.n_heads).view(1, -1, 1, 1)
    b = torch.arange(allowed.shape[0]).view(-1, 1, 1, 1)
    assert torch.equal(mask.mask_mod(b, heads, q, k).expand_as(allowed), allowed)


@pytest.mark.parametrize("name,params,causal", [c for c in CASES if "per_head" not in str(c)])
def test_flex_attention_with_the_mask_equals_the_reference(name, params, causal):
    pattern = make_pattern(name, causal=causal, **params)
    backend = make_backend("flex", pattern, 64)
    docs, keep = batch()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, S, 16, generator=g) for _ in range(3))
    geo = BatchGeometry(S, S, key_padding_mask=keep, document_ids=docs, device=torch.device("cpu"))
    with torch.no_grad():
        out = backend.attend(q, k, v, backend.prepare(geo, q.dtype), 0.0)
    allowed = pattern.dense_mask(S)[None] & (docs[:, None, :, None] == docs[:, None, None, :])
    allowed = allowed & keep[:, None, None, :]
    scores = (q @ k.transpose(-1, -2)) / 4.0
    expected = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num() @ v
    rows = keep[:, None, :, None]  # padding queries attend nothing: not compared
    torch.testing.assert_close(out * rows, expected * rows, atol=2e-5, rtol=1e-4)


class HostSyncs(TorchFunctionMode):
    """Counts the calls that read a tensor's values on the host: on a GPU, each waits for
    the device (what torch.cuda.set_sync_debug_mode reports there)."""

    NAMES = frozenset(
        {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"}
        | {"numpy", "cpu", "any", "all"}
    )

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES and not (name in ("any", "all") and (args[1:] or kwargs)):
            self.calls.append(name)  # any()/all() without a dim reduce to a host bool
        return func(*args, **(kwargs or {}))


def test_a_batch_mask_costs_no_host_sync_and_a_plain_batch_reuses_the_mask():
    pattern = make_pattern("bigbird", causal=True, block=64, window=3, global_blocks=[0], random=2)
    backend = make_backend("flex", pattern, 64)
    docs, keep = batch()
    plain = BatchGeometry(S, S, device=torch.device("cpu"))
    first = backend.prepare(plain, torch.float32)  # builds the layout once: syncs allowed
    with HostSyncs() as syncs:
        assert backend.prepare(plain, torch.float32) is first
        geo = BatchGeometry(S, S, key_padding_mask=keep, document_ids=docs, device=plain.device)
        backend.prepare(geo, torch.float32)
    assert syncs.calls == []
    with HostSyncs() as syncs:  # the counter sees a sync where there is one
        bool(keep.all())
    assert syncs.calls == ["all", "__bool__"]


def _cuda_default_configs(capability: tuple[int, int]) -> list[tuple[str, tuple[int, ...]]]:
    """Every default flex tile torch 2.13's CUDA heuristics choose on a GPU of `capability`,
    forward (BLOCK_M, BLOCK_N) and backward (BLOCK_M1, N1, M2, N2), per dtype and head_dim."""
    import torch._inductor.template_heuristics.triton as heuristics

    real = torch.cuda.get_device_capability
    torch.cuda.get_device_capability = lambda *a, **k: capability
    try:
        h = heuristics.CUDAConfigHeuristic()
        tiles = []
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for head_dim in (16, 32, 64, 96, 128, 192, 256):
                for c in h.get_flex_attn_fwd_configs(head_dim, dtype):
                    tiles.append((f"fwd {dtype} {head_dim}", (c.block_m, c.block_n)))
                for c in h.get_flex_attn_bwd_configs(head_dim, dtype):
                    tile = (c.block_m1, c.block_n1, c.block_m2, c.block_n2)
                    tiles.append((f"bwd {dtype} {head_dim}", tile))
        return tiles
    finally:
        torch.cuda.get_device_capability = real


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)])
def test_every_default_cuda_flex_tile_divides_the_block_mask_tile(capability):
    tiles = _cuda_default_configs(capability)
    assert len(tiles) >= 42  # forward and backward for 3 dtypes x 7 head dims
    bad = [(what, t) for what, t in tiles if any(FLEX_BLOCK % x for x in t)]
    assert bad == []
    # the tile 64 that the pattern blocks default to would not compile on H100 in bf16
    if capability == (9, 0):
        assert any(64 % x for _, t in tiles for x in t)
