"""Every pattern's mask_mod under torch.compile, as FlexAttention compiles it: one graph, no
table rebuilt and no host sync inside it, the same mask as in eager and as the dense
reference; and FlexAttention itself under torch.compile on CPU with such a mask_mod."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from models.attention import make_pattern
from models.attention.patterns import PATTERNS, MaskMod

S = 100  # not a multiple of any block below: the last block is partial

# name, params: causal and bidirectional variants, prefix-LM, global ranges, per-head draws
CASES = [
    ("dense", {"causal": False}),
    ("dense", {"causal": True, "prefix": 13}),
    ("sliding_window", {"window": 11, "causal": False}),
    ("dilated", {"window": 5, "dilation": 3, "causal": True}),
    ("strided", {"stride": 7}),
    ("fixed", {"stride": 8, "summary": 2}),
    ("longformer", {"window": 9, "global_tokens": [0, [20, 23]], "causal": False}),
    (
        "longformer",
        {"window": 6, "dilation": 2, "global_tokens": [5, [30, 34]], "causal": True, "prefix": 4},
    ),
    ("bigbird", {"block": 8, "window": 3, "global_blocks": [0, 5], "random": 2, "causal": True}),
    (
        "bigbird",
        {"block": 16, "window": 3, "random": 2, "per_head": True, "heads": 4, "causal": False},
    ),
    ("variable", {"block": 8, "local_windows": [2, 3], "global_blocks": [1], "causal": True}),
    (
        "variable",
        {
            "block": 8,
            "local_windows": [4],
            "global_blocks": [0],
            "global_end_blocks": [2],
            "horizontal_global": True,
        },
    ),
    (
        "deepspeed",
        {
            "mode": "fixed",
            "block": 8,
            "num_global_blocks": 2,
            "different_layout_per_head": True,
            "num_different_global_patterns": 2,
            "heads": 3,
            "causal": False,
            "horizontal_global_attention": True,
        },
    ),
    (
        "deepspeed",
        {"mode": "bigbird", "block": 16, "num_random_blocks": 2, "causal": True, "prefix": 5},
    ),
    (
        "deepspeed",
        {"mode": "bslongformer", "block": 8, "global_block_indices": [3], "causal": False},
    ),
]
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CASES)]

# tensors made from Python values: a table rebuilt on every call of the mask_mod
FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.arange}
# a tensor's value read on the host; Dynamo puts `int(t)` into the graph as `.item()` rather
# than breaking it, so fullgraph=True alone lets it through (vmap, as in flex, refuses it)
HOST_READS = {"item", "tolist"}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every case compiles the same wrapper code: start each from an empty cache, so none
    runs into the recompile limit and falls back to eager."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_mask_mod(mask_mod: MaskMod, backend: str) -> tuple[MaskMod, list[torch.fx.GraphModule]]:
    """torch.compile(fullgraph=True) of a function calling `mask_mod`; for backend "eager"
    the graphs Dynamo hands over are kept, to be inspected."""
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):  # eager backend
        graphs.append(gm)
        return gm.forward

    def apply(b, h, q_idx, k_idx):
        return mask_mod(b, h, q_idx, k_idx)

    compiled = torch.compile(
        apply, fullgraph=True, backend=capture if backend == "eager" else backend
    )
    return compiled, graphs


def ops_to_keep_out(gm: torch.fx.GraphModule) -> list[str]:
    """The graph's table constructions and host reads."""
    return [
        str(getattr(node.target, "__name__", node.target))
        for node in gm.graph.nodes
        if (node.op == "call_function" and node.target in FACTORIES)
        or (node.op == "call_method" and node.target in HOST_READS)
    ]


def test_every_registered_pattern_has_a_compile_case():
    assert {name for name, _ in CASES} == set(PATTERNS)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_mask_mod_traces_in_one_graph_and_matches_eager_and_dense(name, params, backend):
    pattern = make_pattern(name, **params)
    mask_mod = pattern.mask_mod_for(S, device="cpu")
    compiled, graphs = compile_mask_mod(mask_mod, backend)
    dense = pattern.dense_mask(S)  # (H|1, S, S)
    # as FlexAttention passes them: b and h 0-d ints, the positions broadcast
    b, q_idx, k_idx = torch.tensor(0), torch.arange(S).view(S, 1), torch.arange(S).view(1, S)
    for head in range(pattern.n_heads):
        h = torch.tensor(head)
        got = compiled(b, h, q_idx, k_idx)  # raises on a graph break (fullgraph=True)
        assert got.dtype == torch.bool and got.shape == (S, S)
        assert torch.equal(got, mask_mod(b, h, q_idx, k_idx))
        assert torch.equal(got, dense[head])
    if backend == "eager":
        assert len(graphs) == 1  # one graph for every head: no recompile on the head's value
        assert ops_to_keep_out(graphs[0]) == []


@pytest.mark.parametrize("start,stop", [(2, 4), (3, 4)])
def test_a_sequence_parallel_ranks_head_slice_traces_as_its_heads_of_the_pattern(start, stop):
    """A rank of a sequence-parallel group attends with heads [start, stop) of a per-head
    pattern (models/parallel.py): its mask_mod, compiled, is those heads' rule, in one graph
    for every head, with the slice's first head as a table, not a constant."""
    from models.attention.patterns import head_slice

    params = {"block": 16, "window": 3, "random": 2, "per_head": True, "heads": 4}
    pattern = make_pattern("bigbird", **params, causal=False)
    local = head_slice(pattern, slice(start, stop))
    compiled, graphs = compile_mask_mod(local.mask_mod_for(S, device="cpu"), "eager")
    dense = pattern.dense_mask(S)
    b, q_idx, k_idx = torch.tensor(0), torch.arange(S).view(S, 1), torch.arange(S).view(1, S)
    for head in range(stop - start):  # flex passes local head indices
        assert torch.equal(compiled(b, torch.tensor(head), q_idx, k_idx), dense[start + head])
    assert len(graphs) == 1 and ops_to_keep_out(graphs[0]) == []
    assert not torch.equal(dense[start], dense[0])  # the slice is not head 0's layout


def test_causal_bigbird_without_a_length_keeps_its_draws_in_eager():
    """mask_mod (no length) sizes causal BigBird's draws from the largest query: eager only,
    documented; FlexAttention always gets mask_mod_for(seq_len)."""
    pattern = make_pattern("bigbird", block=8, window=3, random=2, causal=True)
    q_idx, k_idx = torch.arange(S).view(S, 1), torch.arange(S).view(1, S)
    assert torch.equal(pattern.mask_mod(None, None, q_idx, k_idx), pattern.dense_mask(S)[0])


FLEX_CASES = [
    pytest.param(
        "bigbird",
        {"block": 32, "window": 3, "random": 2, "per_head": True, "heads": 4},
        64,
        id="bigbird-per-head",
    ),
    pytest.param(
        "longformer",
        {"window": 33, "global_tokens": [0, [100, 110]], "causal": True},
        32,
        id="longformer-causal",
    ),
]


@pytest.mark.parametrize("name,params,block_size", FLEX_CASES)
def test_compiled_flex_attention_with_the_mask_mod_matches_the_dense_reference(
    name, params, block_size
):
    seq_len, heads, dim = 256, 4, 16
    pattern = make_pattern(name, **params)
    mask_mod = pattern.mask_mod_for(seq_len, device="cpu")
    block_mask = create_block_mask(
        mask_mod,
        B=None,
        H=pattern.n_heads,
        Q_LEN=seq_len,
        KV_LEN=seq_len,
        device="cpu",
        BLOCK_SIZE=block_size,
    )
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq_len, dim, generator=g) for _ in range(3))  # (B, H, S, D)

    def attend(q, k, v, block_mask):
        return flex_attention(q, k, v, block_mask=block_mask)

    with torch.no_grad():  # FlexAttention has no CPU backward
        out = torch.compile(attend, fullgraph=True, backend="eager")(q, k, v, block_mask)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dim)  # (B, H, S, S)
    scores = scores.masked_fill(~pattern.dense_mask(seq_len), float("-inf"))
    expected = torch.softmax(scores, dim=-1) @ v
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
