"""`from_deepspeed` against DeepSpeed's own layouts: the `make_layout` of DeepSpeed 0.15.4's
sparsity_config.py (vendored unchanged in tests/vendor/deepspeed), for every mode and both
directions, over a grid of configs and lengths: block for block equal without random
blocks; with them, the same fixed part, and random blocks of DeepSpeed's count and range."""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import random
from pathlib import Path

import pytest
import torch

from models.attention import AttentionSpecError, make_pattern
from models.attention.deepspeed import SECTION_KEYS, from_deepspeed

VENDOR = Path(__file__).parent / "vendor" / "deepspeed" / "sparsity_config.py"
HEADS = 4
BLOCKS = (1, 2, 3, 5, 8, 13, 24)  # sequence lengths, in blocks


def _deepspeed():
    spec = importlib.util.spec_from_file_location("deepspeed_sparsity_config", VENDOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DS = _deepspeed()
CLASSES = {
    "dense": DS.DenseSparsityConfig,
    "fixed": DS.FixedSparsityConfig,
    "variable": DS.VariableSparsityConfig,
    "bigbird": DS.BigBirdSparsityConfig,
    "bslongformer": DS.BSLongformerSparsityConfig,
    "local": DS.LocalSlidingWindowSparsityConfig,
}


def deepspeed_layout(section: dict, seq_len: int) -> torch.Tensor:
    """(heads, N, N) bool: DeepSpeed's layout of `section`, its class given the keys its
    constructor takes (as DeepSpeed's JSON parser passes them), restricted to the blocks at
    or below the diagonal for unidirectional attention."""
    cls = CLASSES[section.get("mode", "fixed")]
    taken = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in section.items() if k in taken}
    layout = cls(num_heads=HEADS, **kwargs).make_layout(seq_len).bool()
    unidirectional = kwargs.get("attention", taken["attention"].default if "attention" in taken
                                else "bidirectional") == "unidirectional"  # fmt: skip
    return torch.tril(layout) if unidirectional else layout


def ours(section: dict, seq_len: int) -> torch.Tensor:
    block = section.get("block", 16)
    layout = from_deepspeed(section, heads=HEADS).block_layout(seq_len, block)
    return layout.expand(HEADS, -1, -1)


def sections() -> list[dict]:
    """Every mode and direction over its parameters (no random blocks)."""
    out: list[dict] = [{"mode": "dense", "block": b} for b in (4, 16)]
    directions = ("unidirectional", "bidirectional")
    for att, (L, G), horizontal in itertools.product(
        directions, [(1, 1), (2, 1), (3, 1), (4, 1), (4, 2), (6, 3), (8, 4)], (False, True)
    ):
        if horizontal and att == "unidirectional":
            continue
        for P in range(1, L // G + 1):
            out.append(
                {"mode": "fixed", "block": 4, "num_local_blocks": L, "num_global_blocks": G,
                 "attention": att, "horizontal_global_attention": horizontal,
                 "different_layout_per_head": P > 1, "num_different_global_patterns": P}
            )  # fmt: skip
    globals_ = [([0], None), ([1, 5], None), ([0, 3, 40], None), ([0, 6], [2, 9]), ([], None)]
    for att, windows, (starts, ends), horizontal in itertools.product(
        directions, ([4], [2, 3], [1, 2, 5], [7]), globals_, (False, True)
    ):
        if not (horizontal and att == "unidirectional"):
            out.append(
                {"mode": "variable", "block": 8, "local_window_blocks": windows,
                 "global_block_indices": starts, "global_block_end_indices": ends,
                 "attention": att, "horizontal_global_attention": horizontal}
            )  # fmt: skip
    for att, W, G in itertools.product(directions, (1, 2, 3, 5), (1, 2)):
        out.append(
            {"mode": "bigbird", "block": 16, "num_sliding_window_blocks": W,
             "num_global_blocks": G, "num_random_blocks": 0, "attention": att}
        )  # fmt: skip
    for att, W, (starts, ends) in itertools.product(directions, (1, 3, 4, 7), globals_):
        out.append(
            {"mode": "bslongformer", "block": 16, "num_sliding_window_blocks": W,
             "global_block_indices": starts, "global_block_end_indices": ends, "attention": att}
        )  # fmt: skip
    for att, W in itertools.product(directions, (1, 2, 3, 6)):
        out.append({"mode": "local", "block": 8, "num_sliding_window_blocks": W, "attention": att})
    return out


SECTIONS = sections()


def test_every_mode_and_direction_is_deepspeeds_layout_block_for_block():
    """The whole grid, each config at every length: zero differing blocks, and a config
    DeepSpeed refuses at a length (a window wider than the sequence) is refused here too."""
    compared = refused = 0
    differing = []
    for section, n in itertools.product(SECTIONS, BLOCKS):
        seq_len = n * section.get("block", 16)
        try:
            want = deepspeed_layout(section, seq_len)
        except ValueError:
            with pytest.raises(AttentionSpecError):
                ours(section, seq_len)
            refused += 1
            continue
        got = ours(section, seq_len)
        if got.shape != want.shape or not torch.equal(got, want):
            differing.append((section, seq_len, int((got != want).sum())))
        compared += 1
    assert differing == [], differing[:5]
    modes = {(s["mode"], s.get("attention", "bidirectional")) for s in SECTIONS}
    assert len(modes) == 11  # dense (one direction, as DeepSpeed's class) and 5 x 2 more
    assert compared > 1000 and refused > 0, (compared, refused)


@pytest.mark.parametrize("att", ["unidirectional", "bidirectional"])
@pytest.mark.parametrize("mode", ["variable", "bigbird"])
def test_random_blocks_are_deepspeeds_in_count_and_range(mode, att):
    """DeepSpeed draws from Python's global `random`, which no seed here reproduces; so:
    the same fixed part as DeepSpeed's with no random blocks, and on top of it, per row and
    head, at most R more blocks, all among DeepSpeed's candidates (causal bigbird: at or
    before the query block); the draws R distinct blocks per row, a different set per head
    with different_layout_per_head, and the same set at every length for causal bigbird."""
    R, n, block = 2, 24, 16
    section = {"mode": mode, "block": block, "num_random_blocks": R, "attention": att,
               "different_layout_per_head": True}  # fmt: skip
    if mode == "bigbird":
        section["num_random_blocks"] = 1 if att == "unidirectional" else R  # DeepSpeed's
        # causal draw takes R from row 0's single candidate: it raises for R > 1
    R = section["num_random_blocks"]
    fixed = deepspeed_layout({**section, "num_random_blocks": 0}, n * block)
    random.seed(0)
    theirs = deepspeed_layout(section, n * block)
    got = ours(section, n * block)
    rows = torch.arange(n).view(n, 1)
    candidates = (torch.arange(n).view(1, n) <= rows) if att == "unidirectional" else True
    for layout in (theirs, got):
        extra = layout & ~fixed
        assert torch.equal(layout | fixed, layout)  # the fixed part is all there
        assert (extra.sum(-1) <= R).all() and not (extra & ~torch.as_tensor(candidates)).any()
    pattern = from_deepspeed(section, heads=HEADS)
    draws = pattern._random(n).view(R, HEADS, n)
    assert ((draws >= 0) & (draws < n)).all()
    if R > 1:
        assert (draws[0] != draws[1]).all()
    assert not torch.equal(got[0], got[1])  # a layout per head
    if mode == "bigbird" and att == "unidirectional":
        assert (draws <= torch.arange(n)).all()
        shorter = from_deepspeed(section, heads=HEADS).block_layout(10 * block, block)
        assert torch.equal(shorter, got[:, :10, :10])


def test_the_token_rule_is_the_layout_of_its_blocks():
    """mask_mod (what flex runs) and the layout (what blocksparse runs) agree at the token
    level, with a partial last block and a tile that is not DeepSpeed's block."""
    for section in (
        {"mode": "fixed", "block": 8, "num_local_blocks": 4, "num_global_blocks": 2,
         "different_layout_per_head": True, "num_different_global_patterns": 2},
        {"mode": "bigbird", "block": 8, "num_random_blocks": 2, "num_global_blocks": 2,
         "different_layout_per_head": True},
        {"mode": "variable", "block": 8, "local_window_blocks": [2, 3], "num_random_blocks": 1,
         "global_block_indices": [1], "horizontal_global_attention": True},
    ):  # fmt: skip
        pattern = from_deepspeed(section, heads=HEADS)
        assert pattern.n_heads == (HEADS if section.get("different_layout_per_head") else 1)
        seq_len = 100
        dense = pattern.dense_mask(seq_len)
        for tile in (8, 16, 12):
            n = -(-seq_len // tile)
            padded = torch.zeros(dense.shape[0], n * tile, n * tile, dtype=torch.bool)
            padded[:, :seq_len, :seq_len] = dense
            reduced = padded.view(-1, n, tile, n, tile).any(4).any(2)
            assert torch.equal(pattern.block_layout(seq_len, tile), reduced), (section, tile)


def test_a_bad_section_is_one_line_naming_the_key():
    cases = [
        ({"mode": "sparse"}, "mode 'sparse' is not one of"),
        ({"num_local_block": 4}, "sparse_attention.num_local_block: not a DeepSpeed"),
        ({"mode": "fixed", "num_local_blocks": 4, "num_global_blocks": 3}, "multiple of"),
        ({"mode": "fixed", "num_different_global_patterns": 2}, "different_layout_per_head"),
        (
            {"mode": "variable", "attention": "unidirectional", "horizontal_global_attention": 1},
            "needs bidirectional",
        ),
        (
            {"mode": "bslongformer", "global_block_indices": [4], "global_block_end_indices": [2]},
            "each end > its start",
        ),
        ({"mode": "bigbird", "attention": "sideways"}, "attention 'sideways' is not one of"),
        ({"mode": "variable", "local_window_blocks": [2, 0]}, "local_window_blocks[1] must be"),
    ]
    for section, message in cases:
        with pytest.raises(AttentionSpecError) as err:
            from_deepspeed(section)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_in_a_job_spec_the_family_decides_the_direction():
    """`attention: {pattern: deepspeed, params: <section>}`: the stack's direction wins, and
    a section that says otherwise is refused rather than silently overridden."""
    params = {"mode": "bslongformer", "block": 16, "num_sliding_window_blocks": 3}
    causal = make_pattern("deepspeed", causal=True, **params)
    bidirectional = make_pattern("deepspeed", causal=False, **params)
    both = bidirectional.block_layout(128, 16)
    assert torch.equal(causal.block_layout(128, 16), torch.tril(both))
    with pytest.raises(AttentionSpecError, match="the model family decides"):
        make_pattern("deepspeed", causal=True, attention="bidirectional", **params)
    assert set(SECTION_KEYS) >= set(params)


def own_pattern(section: dict):
    """attnpipe's own token-defined pattern for the configs docs/attention.md says map to one
    exactly; None for the others."""
    mode, block = section["mode"], section.get("block", 16)
    causal = section.get("attention") == "unidirectional"
    if mode == "fixed" and causal and section["num_different_global_patterns"] == 1:
        L, G = section["num_local_blocks"], section["num_global_blocks"]
        return make_pattern("fixed", stride=L * block, summary=G * block, causal=True)
    if mode == "variable":
        ends = section["global_block_end_indices"]
        return make_pattern(
            "variable",
            block=block,
            local_windows=section["local_window_blocks"],
            global_blocks=section["global_block_indices"],
            global_end_blocks=ends,
            horizontal_global=section["horizontal_global_attention"],
            causal=causal,
        )
    if mode == "bigbird" and not causal:
        G, W = section["num_global_blocks"], section["num_sliding_window_blocks"]
        return make_pattern("bigbird", block=block, window=W, global_blocks=range(G), random=0)
    return None


def test_the_porting_tables_exact_rows_are_exact():
    """docs/attention.md's table: which DeepSpeed configs are one of attnpipe's own patterns,
    block for block (those it says are not are the `deepspeed` pattern's job)."""
    compared = 0
    for section, n in itertools.product(SECTIONS, BLOCKS):
        pattern, seq_len = own_pattern(section), n * section.get("block", 16)
        if pattern is None:
            continue
        try:
            want = deepspeed_layout(section, seq_len)
            got = pattern.block_layout(seq_len, section.get("block", 16))
        except (ValueError, AttentionSpecError):
            continue
        assert torch.equal(got.expand_as(want), want), (section, seq_len)
        compared += 1
    assert compared > 300, compared
