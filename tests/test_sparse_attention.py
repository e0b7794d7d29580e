"""Sparse attention: every pattern on every backend against the dense reference, forward and
backward; layouts against the block reduction of the dense mask; the papers' definitions on
hand-written cases; adaptive span; heatmaps; bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import models.attention.blocksparse as blocksparse_module
from models import AttentionConfig, build_model, preset_config
from models.attention import (
    AttentionSpecError,
    BatchGeometry,
    build_plan,
    make_backend,
    make_pattern,
    native,
    sparse_attention,
)
from models.attention.adaptive_span import clamp_spans, current_spans, span_penalty
from models.attention.blocksparse import BlockSparsePlan
from models.config import AdaptiveSpanConfig
from models.heatmap import attention_heatmaps
from models.maps import attention_maps

# name, params, defined bidirectionally?
PATTERNS = [
    ("dense", {}, True),
    ("sliding_window", {"window": 11}, True),
    ("dilated", {"window": 5, "dilation": 3}, True),
    ("strided", {"stride": 7}, False),
    ("fixed", {"stride": 8, "summary": 2}, False),
    ("longformer", {"window": 9, "global_tokens": [0, [20, 23]]}, True),
    ("longformer", {"window": 6, "dilation": 2, "global_tokens": [5]}, True),
    ("bigbird", {"block": 8, "window": 3, "global_blocks": [0], "random": 2, "seed": 3}, True),
    ("bigbird", {"block": 16, "window": 3, "random": 1, "per_head": True, "heads": 4}, True),
    ("variable", {"block": 8, "local_windows": [2, 3], "global_blocks": [1]}, True),
    (
        "variable",
        {
            "block": 8,
            "local_windows": [4],
            "global_blocks": [0],
            "global_end_blocks": [2],
            "horizontal_global": True,
        },
        True,
    ),
    ("dense", {"prefix": 13}, False),
    ("sliding_window", {"window": 8, "prefix": 10}, False),
    (  # DeepSpeed's fixed mode, its global blocks differing by head
        "deepspeed",
        {
            "mode": "fixed",
            "block": 8,
            "num_local_blocks": 3,
            "different_layout_per_head": True,
            "num_different_global_patterns": 3,
            "heads": 4,
        },
        True,
    ),
]
CASES = [
    pytest.param(name, params, causal, id=f"{name}-{i}-{'causal' if causal else 'bidir'}")
    for i, (name, params, bidir) in enumerate(PATTERNS)
    for causal in ([True, False] if bidir else [True])
]
BLOCK = 16


def reference(q, k, v, mask):
    """Masked dense softmax, written out: the ground truth."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return (s.masked_fill(~mask, float("-inf")).softmax(-1) @ v.float()).to(q.dtype)


def qkv(seq_len, dtype, heads=4, kv_heads=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, heads, seq_len, dim), (2, kv_heads, seq_len, dim), (2, kv_heads, seq_len, dim)]
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def assert_matches_reference(out, inputs, mask):
    """`out` and the gradients of `inputs` equal the reference's (looser for bf16)."""
    refs = [t.detach().clone().requires_grad_() for t in inputs]
    expected = reference(*refs, mask)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    fp32 = out.dtype == torch.float32
    tol = dict(atol=2e-5, rtol=1e-4) if fp32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out, expected, **tol)
    for got, want in zip(inputs, refs, strict=True):
        torch.testing.assert_close(got.grad, want.grad, **tol)


@pytest.fixture
def two_threads():
    """Two cores, as on the CI machine: the tests' 4 (batch, head) pairs are enough for the
    native loop, which runs only with at least one pair per core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(
    params=[(True, 1 << 21), (True, 6000), (False, 1 << 21), (False, 6000)],
    ids=["native-one-chunk", "native-many-chunks", "python-one-chunk", "python-many-chunks"],
)
def chunk_bytes(request, monkeypatch, two_threads):
    """The kernel's two loops, the native one (C++) and the Python one, each with one step
    per head and with many."""
    use_native, chunk = request.param
    if use_native:
        assert native.kernel() is not None, "the native block-sparse kernel did not build"
    monkeypatch.setattr(native, "ENABLED", use_native)
    monkeypatch.setattr(blocksparse_module, "CHUNK_BYTES", chunk)
    monkeypatch.setattr(blocksparse_module, "NATIVE_CHUNK_BYTES", chunk)


@pytest.mark.parametrize("seq_len", [64, 75], ids=["multiple", "not-multiple"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,params,causal", CASES)
def test_blocksparse_matches_reference_forward_and_backward(
    name, params, causal, dtype, seq_len, chunk_bytes
):
    pattern = make_pattern(name, causal=causal, **params)
    q, k, v = qkv(seq_len, dtype)
    out = sparse_attention(q, k, v, pattern, "blocksparse", block_size=BLOCK)
    mask = pattern.dense_mask(seq_len).unsqueeze(0)
    assert_matches_reference(out, (q, k, v), mask)


@pytest.mark.parametrize("seq_len", [64, 75], ids=["multiple", "not-multiple"])
@pytest.mark.parametrize("name,params,causal", [c for c in CASES if c.values[0] != "dense"])
def test_blocksparse_reads_heads_split_from_the_model_layout(
    name, params, causal, seq_len, chunk_bytes
):
    """A model splits heads from (B, S, H, D), so each head's rows are strided: the kernel
    must read them where they lie (a sliding window once read them as if contiguous)."""
    pattern = make_pattern(name, causal=causal, **params)
    g = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(2, seq_len, h, 16, generator=g).transpose(1, 2).requires_grad_()
        for h in (4, 2, 2)
    )
    assert not k.is_contiguous()
    out = sparse_attention(q, k, v, pattern, "blocksparse", block_size=BLOCK)
    assert_matches_reference(out, (q, k, v), pattern.dense_mask(seq_len).unsqueeze(0))


WIDE_ROWS = [  # bidirectional patterns whose global query blocks meet every key block
    pytest.param(
        "bigbird", {"block": 16, "window": 3, "global_blocks": [0], "random": 2}, id="bigbird"
    ),
    pytest.param("longformer", {"window": 24, "global_tokens": [[88, 92]]}, id="longformer-mid"),
]


@pytest.mark.parametrize("docs", [False, True], ids=["one-doc", "documents"])
@pytest.mark.parametrize("seq_len", [256, 250], ids=["multiple", "not-multiple"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,params", WIDE_ROWS)
def test_wide_query_rows_take_a_dense_pass(name, params, dtype, seq_len, docs, chunk_bytes):
    """Global queries attend every key: padding every row to their width would make the
    kernel dense, so they are computed apart, and the rest keep a narrow slot list."""
    pattern = make_pattern(name, causal=False, **params)
    plan = build_plan(pattern, seq_len, BLOCK)
    assert plan.dense is not None and len(plan.dense.rows) == BLOCK  # one global block
    assert plan.slots <= 8 < plan.n_blocks  # not the 16 a global row would need
    covered = sorted(i for c0, c1 in plan.ranges for i in range(c0, c1))
    dense_blocks = sorted(set((plan.dense.rows // BLOCK).tolist()))
    assert sorted(covered + dense_blocks) == list(range(plan.n_blocks))  # each row once

    doc_ids = None
    mask = pattern.dense_mask(seq_len).unsqueeze(0)
    if docs:
        doc_ids = (torch.arange(seq_len) >= 100).long().view(1, -1).repeat(2, 1)
        doc_ids[1] = 0
        mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    q, k, v = qkv(seq_len, dtype)
    out = sparse_attention(q, k, v, pattern, "blocksparse", BLOCK, document_ids=doc_ids)
    assert_matches_reference(out, (q, k, v), mask)


def test_only_outlier_rows_leave_the_slots():
    """Causal patterns (a global query sees only its past) and patterns whose rows widen
    gradually (dense causal, strided) keep every row in the slots; a bidirectional BigBird
    at 8K keeps 7 slots per row instead of 128."""
    for name, params, _ in PATTERNS:
        plan = build_plan(make_pattern(name, causal=True, **params), 4096, 64)
        assert plan.dense is None, name
    bigbird = make_pattern("bigbird", causal=False, block=64, window=3, global_blocks=[0], random=3)
    plan = build_plan(bigbird, 8192, 64)
    assert plan.slots == 7 and plan.dense is not None and len(plan.dense.rows) == 64
    assert plan.dense.bias is None  # a global row attends everything: no mask to add


@pytest.mark.parametrize("name,params,causal", CASES)
def test_reference_and_flex_backends_match_the_dense_mask(name, params, causal):
    pattern = make_pattern(name, causal=causal, **params)
    q, k, v = qkv(75, torch.float32)
    expected = reference(q, k, v, pattern.dense_mask(75).unsqueeze(0))
    torch.testing.assert_close(
        sparse_attention(q, k, v, pattern, "reference"), expected, atol=2e-5, rtol=1e-4
    )
    with torch.no_grad():  # FlexAttention has no CPU backward: forward only here
        flex = sparse_attention(q, k, v, pattern, "flex", block_size=BLOCK)
    torch.testing.assert_close(flex, expected, atol=2e-5, rtol=1e-4)


def test_flex_backward_on_cpu_fails_clearly():
    q, k, v = qkv(32, torch.float32)
    with pytest.raises(AttentionSpecError, match="no backward pass on CPU"):
        sparse_attention(q, k, v, make_pattern("dense", causal=True), "flex", block_size=16)


@pytest.mark.parametrize("backend", ["blocksparse", "reference"])
def test_document_masking_composes_with_patterns(backend):
    docs = torch.tensor([[0] * 20 + [1] * 30 + [2] * 14, [0] * 64])
    pattern = make_pattern("longformer", window=12, global_tokens=[0], causal=True)
    q, k, v = qkv(64, torch.float32)
    same_doc = docs[:, None, :, None] == docs[:, None, None, :]
    mask = pattern.dense_mask(64).unsqueeze(0) & same_doc
    out = sparse_attention(q, k, v, pattern, backend, block_size=16, document_ids=docs)
    torch.testing.assert_close(out, reference(q, k, v, mask), atol=2e-5, rtol=1e-4)
    # a token of document 1 is blind to document 0, even to its global token 0
    assert not mask[0, 0, 25, 0] and mask[1, 0, 25, 0]


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("seq_len", [100, 256, 300])
@pytest.mark.parametrize("name,params,causal", CASES)
def test_block_layout_is_the_block_reduction_of_the_dense_mask(
    name, params, causal, seq_len, block_size
):
    pattern = make_pattern(name, causal=causal, **params)
    mask = pattern.dense_mask(seq_len)
    n = math.ceil(seq_len / block_size)
    padded = torch.zeros(mask.shape[0], n * block_size, n * block_size, dtype=torch.bool)
    padded[:, :seq_len, :seq_len] = mask
    reduced = padded.view(-1, n, block_size, n, block_size).any(dim=(2, 4))
    layout = pattern.block_layout(seq_len, block_size)
    assert torch.equal(layout.expand_as(reduced), reduced)


def test_block_layout_never_evaluates_the_token_rule(monkeypatch):
    for name, params, _ in PATTERNS:
        pattern = make_pattern(name, causal=True, **params)

        def boom(*args, **kwargs):
            raise AssertionError("block_layout evaluated the token rule")

        monkeypatch.setattr(type(pattern), "_rule", boom)
        layout = pattern.block_layout(65536, 64)
        assert layout.shape[-2:] == (1024, 1024)
        monkeypatch.undo()


def test_blocksparse_memory_is_linear_in_length():
    pattern = make_pattern("sliding_window", window=128, causal=True)

    def plan_bytes(seq_len):
        plan = build_plan(pattern, seq_len, 64)
        masks = sum(m.numel() for chunk in plan.masks for _, _, m in chunk)
        return masks + plan.kv_idx.numel() * 8

    small, large = plan_bytes(4096), plan_bytes(8192)
    assert large <= 2.1 * small
    assert plan_bytes(8192) < 8192 * 8192 / 20  # far from S x S
    plan = build_plan(pattern, 8192, 64)
    assert plan.band_lead == 2 and plan.slots == 3  # a band: K/V read as strided views


def test_blocksparse_plans_are_built_once_per_length():
    """Without documents or padding a plan depends on the length alone: every step after the
    first reuses it; a batch with documents gets its own; a pickled model carries none."""
    import pickle

    backend = make_backend("blocksparse", make_pattern("bigbird", causal=True), 16)
    geo = BatchGeometry(q_len=256, kv_len=256)
    first = backend.prepare(geo, torch.float32)
    assert backend.prepare(BatchGeometry(q_len=256, kv_len=256), torch.float32) is first
    assert backend.prepare(BatchGeometry(q_len=128, kv_len=128), torch.float32) is not first
    docs = torch.zeros(1, 256, dtype=torch.long)
    with_docs = backend.prepare(BatchGeometry(q_len=256, kv_len=256, document_ids=docs), None)
    assert with_docs is not first and with_docs is not backend.prepare(
        BatchGeometry(q_len=256, kv_len=256, document_ids=docs), None
    )
    for length in (64, 80, 96, 112, 128):  # the cache keeps the last few lengths only
        backend.prepare(BatchGeometry(q_len=length, kv_len=length), torch.float32)
    assert len(backend._by_length) == backend.LENGTH_CACHE
    assert pickle.loads(pickle.dumps(backend))._by_length == {}


@pytest.mark.parametrize(
    "name,params",
    [
        ("bigbird", {"block": 16, "window": 3, "global_blocks": [0], "random": 2}),
        ("sliding_window", {"window": 40}),
    ],
)
def test_native_kernel_computes_what_the_python_loop_does(name, params, monkeypatch, two_threads):
    """The C++ loop runs the Python loop's ops in the same order, heads on several cores: bit
    for bit the same outputs and gradients, here for heads split from (B, S, H, D), GQA, a
    length off the block, documents (per-row plans) and more than one step per head."""
    assert native.kernel() is not None, "the native block-sparse kernel did not build"
    monkeypatch.setattr(blocksparse_module, "CHUNK_BYTES", 20_000)
    monkeypatch.setattr(blocksparse_module, "NATIVE_CHUNK_BYTES", 20_000)
    pattern = make_pattern(name, causal=True, **params)
    S = 300
    docs = torch.tensor([[0] * 120 + [1] * 180, [0] * S])
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn(2, S, h, 16, generator=g).transpose(1, 2) for h in (4, 2, 2)]
    results = []
    for use_native in (True, False):
        monkeypatch.setattr(native, "ENABLED", use_native)
        plan = build_plan(pattern, S, BLOCK, document_ids=docs)
        assert plan.n_blocks // plan.chunk > 1
        q, k, v = (t.detach().clone().requires_grad_() for t in inputs)
        used = blocksparse_module._native_loop(q, 2 * 2)  # the backward's (batch, kv head) pairs
        assert (used is not None) == use_native
        out = blocksparse_module.block_sparse_attention(q, k, v, plan)
        out.backward(torch.ones_like(out))
        results.append([out, q.grad, k.grad, v.grad])
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)


def test_native_kernel_build_failure_falls_back_to_the_python_loop(monkeypatch, caplog):
    """Without a compiler the kernel says so once and computes with its Python loop."""
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("c++: command not found\nmore detail")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(native, "_built", {})
    with caplog.at_level("WARNING", logger=native.__name__):
        assert native.kernel() is None
        assert native.kernel() is None
    assert [r.getMessage() for r in caplog.records] == [
        "the native block-sparse CPU kernel did not build (c++: command not found): Python loop"
    ]
    pattern = make_pattern("bigbird", causal=True, block=16, window=3, random=2)
    q, k, v = qkv(96, torch.float32)
    out = sparse_attention(q, k, v, pattern, "blocksparse", block_size=BLOCK)
    assert_matches_reference(out, (q, k, v), pattern.dense_mask(96).unsqueeze(0))


# ------------------------------------------------------------- the papers, by hand


def rows(pattern, seq_len, *queries):
    mask = pattern.dense_mask(seq_len)[0]
    return {q: mask[q].nonzero().flatten().tolist() for q in queries}


def test_strided_is_child_et_al():
    # A1: the previous l positions; A2: every l-th position back (l = 3)
    got = rows(make_pattern("strided", stride=3), 8, 5, 7)
    assert got == {5: [2, 3, 4, 5], 7: [1, 4, 5, 6, 7]}


def test_fixed_is_child_et_al():
    # blocks of l = 4, summary c = 1: own block so far, plus the last position of each block
    got = rows(make_pattern("fixed", stride=4, summary=1), 10, 6, 9, 3)
    assert got == {6: [3, 4, 5, 6], 9: [3, 7, 8, 9], 3: [0, 1, 2, 3]}
    # c = 2 summary positions
    assert rows(make_pattern("fixed", stride=4, summary=2), 10, 9)[9] == [2, 3, 6, 7, 8, 9]


def test_longformer_globals_attend_and_are_attended():
    pattern = make_pattern("longformer", window=3, global_tokens=[0, 9], causal=False)
    mask = pattern.dense_mask(12)[0]
    assert mask[0].all() and mask[9].all()  # global rows see everything
    assert mask[:, 0].all() and mask[:, 9].all()  # everyone sees the globals
    assert mask[5].nonzero().flatten().tolist() == [0, 4, 5, 6, 9]  # window 1 each side
    causal = make_pattern("longformer", window=3, global_tokens=[4], causal=True).dense_mask(8)[0]
    assert causal[4].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    assert causal[7].nonzero().flatten().tolist() == [4, 5, 6, 7]


def test_bigbird_block_counts_per_row():
    pattern = make_pattern("bigbird", block=4, window=3, global_blocks=[0], random=2, seed=5)
    n = 16
    layout = pattern.block_layout(n * 4, 4)[0]  # BigBird block = tile: its own block grid
    random = pattern.random_blocks(n)
    for a in range(1, n):
        window = {a - 1, a, min(a + 1, n - 1)}
        drawn = set(random[a].tolist())
        # r distinct random blocks, outside the window and the global block, as in the paper
        assert len(drawn) == 2 and not drawn & (window | {0})
        expected = window | {0} | drawn
        assert set(layout[a].nonzero().flatten().tolist()) == expected
        if 2 <= a <= n - 2:
            assert len(expected) == 3 + 1 + 2  # window + global + random, every row alike
    assert layout[0].all()  # the global block row
    causal = make_pattern("bigbird", block=4, window=3, global_blocks=[0], random=2, causal=True)
    table = causal.random_blocks(n)
    # causal: from the blocks before the window (a-2..a) other than the global block 0
    assert all(set(table[a].tolist()) <= set(range(1, a - 2)) for a in range(5, n))
    assert table[4].tolist() in ([1, -1], [-1, 1])  # one candidate only: the row has fewer
    assert torch.equal(causal.random_blocks(8), table[:8])  # the same draws at any length
    # seeded and reproducible; another seed draws other blocks
    again = make_pattern("bigbird", block=4, window=3, global_blocks=[0], random=2, seed=5)
    assert torch.equal(again.random_blocks(n), random)
    other = make_pattern("bigbird", block=4, window=3, global_blocks=[0], random=2, seed=6)
    assert not torch.equal(other.random_blocks(n), random)


def test_bigbird_per_head_layouts_differ():
    pattern = make_pattern("bigbird", block=8, random=2, per_head=True, heads=4)
    layout = pattern.block_layout(256, 8)
    assert layout.shape[0] == 4
    assert not torch.equal(layout[0], layout[1])


def test_dilated_is_longformer_section_3_1():
    # Beltagy et al. 2020, 3.1: a window of w keys with gaps of size d - 1 between them, so a
    # layer reaches w x d tokens; causal: the w keys q, q - d, ..., q - (w - 1) d
    causal = make_pattern("dilated", window=3, dilation=2, causal=True)
    assert rows(causal, 12, 0, 3, 4, 11) == {0: [0], 3: [1, 3], 4: [0, 2, 4], 11: [7, 9, 11]}
    # bidirectional: w // 2 keys on either side, d apart
    both = make_pattern("dilated", window=5, dilation=3, causal=False)
    assert rows(both, 16, 0, 7, 15) == {0: [0, 3, 6], 7: [1, 4, 7, 10, 13], 15: [9, 12, 15]}
    # dilation 1 is the sliding window
    plain = make_pattern("dilated", window=4, dilation=1, causal=True)
    window = make_pattern("sliding_window", window=4, causal=True)
    assert torch.equal(plain.dense_mask(20), window.dense_mask(20))


def test_variable_matches_deepspeed_semantics():
    pattern = make_pattern("variable", block=1, local_windows=[2, 3], global_blocks=[0])
    assert rows(pattern, 8, 1, 3, 6) == {1: [0, 1], 3: [0, 2, 3, 4], 6: [0, 5, 6, 7]}


def test_prefix_lm_is_bidirectional_in_the_prefix():
    mask = make_pattern("dense", causal=True, prefix=3).dense_mask(6)[0]
    assert mask[0, 2] and mask[1, 2]  # the prefix sees itself both ways
    assert not mask[3, 4] and mask[4, 3]  # causal after it


# ------------------------------------------------------------- in a model


@pytest.mark.parametrize("name,params,causal", [c for c in CASES if c.values[2]])
def test_test_size_decoder_trains_with_each_sparse_pattern(name, params, causal):
    torch.manual_seed(0)
    cfg = preset_config("tiny", positional="rope", max_seq_len=64)
    attention = AttentionConfig(pattern=name, params=params, backend="blocksparse", block_size=16)
    model = build_model(cfg, attention).train()
    ids = torch.randint(0, 512, (2, 49), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_sparse_model_matches_reference_backend_model():
    attention = dict(pattern="bigbird", params={"block": 16, "random": 1}, block_size=16)
    cfg = preset_config("tiny", positional="rope")
    torch.manual_seed(0)
    fast = build_model(cfg, AttentionConfig(backend="blocksparse", **attention)).eval()
    slow = build_model(cfg, AttentionConfig(backend="reference", **attention)).eval()
    slow.load_state_dict(fast.state_dict())
    ids = torch.randint(0, 512, (2, 70))
    torch.testing.assert_close(fast(ids), slow(ids), atol=1e-4, rtol=1e-4)


def test_kv_cache_generation_works_with_sparse_patterns():
    from models.generate import generate

    cfg = preset_config("tiny", positional="rope")
    attention = AttentionConfig(
        pattern="sliding_window", params={"window": 6}, backend="blocksparse", block_size=16
    )
    torch.manual_seed(0)
    model = build_model(cfg, attention).eval()
    prompt = torch.randint(0, 512, (1, 20))
    assert torch.equal(
        generate(model, prompt, 8, use_cache=True), generate(model, prompt, 8, use_cache=False)
    )


# ------------------------------------------------------------- adaptive span


def span_model(init=0.3, max_span=40):
    torch.manual_seed(0)
    attention = AttentionConfig(
        adaptive_span=AdaptiveSpanConfig(max_span=max_span, ramp=8, init=init), block_size=16
    )
    return build_model(preset_config("tiny", positional="rope"), attention)


def test_adaptive_span_sends_gradient_to_its_spans():
    model = span_model(init=0.3).train()
    ids = torch.randint(0, 512, (2, 65))
    loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    (loss + 1e-3 * span_penalty(model)).backward()
    fractions = [m.attn.span.fraction for m in model.decoder.blocks]
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in fractions)
    spans = current_spans(model)
    assert set(spans) == {0, 1} and len(spans[0]) == 4
    assert spans[0][0] == pytest.approx(0.3 * 40)


def test_adaptive_span_soft_mask_and_compute_follow_the_span():
    model = span_model(init=0.25, max_span=40).eval()  # spans 10 tokens, ramp 8
    span = model.decoder.blocks[0].attn.span
    m = span.soft_mask(torch.tensor([0.0, 10.0, 14.0, 18.0, 30.0, -1.0]))
    torch.testing.assert_close(m[0], torch.tensor([1.0, 1.0, 0.5, 0.0, 0.0, 0.0]))
    assert span.window() == 18  # keys beyond the largest span + ramp are never scored
    ids = torch.randint(0, 512, (1, 60))
    changed = ids.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 512
    out_a, out_b = model(ids), model(changed)
    # position 10 can reach positions 10..27 in one layer, 10..45 in two; beyond: untouched
    torch.testing.assert_close(out_a[0, 46:], out_b[0, 46:])
    assert not torch.allclose(out_a[0, 10:28], out_b[0, 10:28])
    maps = attention_maps(model, {"input_ids": ids[:, :30]}, layers=[0])[0]
    assert (maps[0, :, 25, :7] == 0).all() and (maps[0, :, 25, 8:26] > 0).all()
    torch.testing.assert_close(maps.sum(-1), torch.ones_like(maps.sum(-1)))


def test_adaptive_span_clamps_and_penalises():
    model = span_model(init=0.5)
    with torch.no_grad():
        model.decoder.blocks[0].attn.span.fraction.fill_(1.7)
    clamp_spans(model)
    assert model.decoder.blocks[0].attn.span.fraction.max() == 1.0
    assert float(span_penalty(model).detach()) == pytest.approx(40 * (1.0 + 0.5))


# ------------------------------------------------------------- heatmaps


@pytest.mark.parametrize("backend", ["blocksparse", "sdpa", "flex"])
def test_heatmaps_render_for_every_backend(tmp_path, backend):
    pattern = "dense" if backend == "sdpa" else "longformer"
    params = {} if backend == "sdpa" else {"window": 4, "global_tokens": [0]}
    torch.manual_seed(0)
    model = build_model(
        preset_config("tiny"),
        AttentionConfig(pattern=pattern, params=params, backend=backend, block_size=16),
    )
    tokens = ["The", "cat", "sat", "on", "the", "mat", ".", "It", "slept", "."]
    ids = torch.randint(0, 512, (1, len(tokens)))
    paths = attention_heatmaps(
        model, {"input_ids": ids}, tokens, tmp_path, layers=[1], heads=[0, 2]
    )
    assert [p.name for p in paths] == ["decoder-layer1-head0.png", "decoder-layer1-head2.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    maps = attention_maps(model, {"input_ids": ids}, layers=[1])[1]
    if backend != "sdpa":
        mask = make_pattern("longformer", window=4, global_tokens=[0], causal=True)
        assert torch.equal(maps[0, 0] > 0, mask.dense_mask(len(tokens))[0])


# ------------------------------------------------------------- bad input


def test_bad_patterns_and_parameters_fail_with_clear_messages():
    with pytest.raises(
        AttentionSpecError,
        match="known patterns: bigbird, deepspeed, dense, dilated, "
        "fixed, longformer, sliding_window, strided, variable",
    ):
        make_pattern("reformer")
    with pytest.raises(AttentionSpecError, match="window must be a positive integer, got 0"):
        make_pattern("sliding_window", window=0)
    with pytest.raises(AttentionSpecError, match="window must be a positive integer, got -3"):
        make_pattern("longformer", window=-3)
    with pytest.raises(AttentionSpecError, match="dilation must be >= 1, got 0"):
        make_pattern("dilated", window=4, dilation=0)
    with pytest.raises(AttentionSpecError, match="global_tokens 300 is out of range"):
        make_pattern("longformer", window=4, global_tokens=[300]).block_layout(256, 64)
    with pytest.raises(AttentionSpecError, match="global_blocks 9 is out of range"):
        make_pattern("bigbird", block=32, global_blocks=[9]).dense_mask(256)
    with pytest.raises(AttentionSpecError, match="causal attention only"):
        make_pattern("strided", stride=4, causal=False)
    with pytest.raises(AttentionSpecError, match="unexpected keyword argument 'windw'"):
        make_pattern("sliding_window", windw=4)


def test_incompatible_backends_fail_at_construction():
    with pytest.raises(AttentionSpecError, match="'bigbird' is not supported by backend 'sdpa'"):
        make_backend("sdpa", make_pattern("bigbird"))
    cfg = preset_config("tiny", positional="alibi")
    with pytest.raises(
        AttentionSpecError, match="alibi' is not supported by backend 'blocksparse'"
    ):
        build_model(cfg, AttentionConfig(backend="blocksparse"))
    with pytest.raises(AttentionSpecError, match="adaptive_span is for a decoder"):
        build_model(
            preset_config("tiny-encoder"),
            AttentionConfig(adaptive_span=AdaptiveSpanConfig(max_span=8)),
        )
    # a pattern every backend supports prepares a plan for each, of the backend's own kind
    geo = BatchGeometry(q_len=8, kv_len=8)
    plan = make_backend("blocksparse", make_pattern("dense")).prepare(geo, torch.float32)
    assert isinstance(plan, BlockSparsePlan) and plan.seq_len == 8 and plan.n_blocks == 1
