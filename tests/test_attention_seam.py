"""The seam sparse attention plugs into: patterns, backends, the per-batch mask, maps."""

from __future__ import annotations

import pytest
import torch

from models import AttentionConfig, attention_maps, build_model, preset_config
from models.attention import (
    BACKENDS,
    AttentionSpecError,
    Backend,
    BatchGeometry,
    Dense,
    make_backend,
    make_pattern,
)


@pytest.mark.parametrize("causal", [False, True])
def test_dense_pattern_three_views_agree(causal):
    pattern = make_pattern("dense", causal=causal)
    mask = pattern.dense_mask(10)
    assert mask.shape == (1, 10, 10) and mask.dtype == torch.bool
    expected = torch.ones(10, 10, dtype=torch.bool)
    assert torch.equal(mask[0], expected.tril() if causal else expected)
    for block in (2, 3, 4):  # including lengths that are not a multiple of the block
        layout = pattern.block_layout(10, block)
        n = -(-10 // block)
        padded = torch.zeros(1, n * block, n * block, dtype=torch.bool)
        padded[:, :10, :10] = mask
        reduced = padded.view(1, n, block, n, block).any(dim=(2, 4))
        assert torch.equal(layout, reduced)


def test_unknown_pattern_and_backend_list_the_known_names():
    with pytest.raises(
        AttentionSpecError, match="known patterns: bigbird, deepspeed, dense, dilated"
    ):
        make_pattern("longformerr")
    with pytest.raises(
        AttentionSpecError, match="known backends: blocksparse, flex, reference, sdpa"
    ):
        make_backend("flash3", Dense())
    with pytest.raises(AttentionSpecError, match="unexpected keyword"):
        make_pattern("dense", window=4)


def test_unsupported_pair_fails_at_construction_naming_both():
    window = make_pattern("sliding_window", window=2, causal=True)
    with pytest.raises(
        AttentionSpecError,
        match="'sliding_window' is not supported by backend "
        "'sdpa' \\(backends that support it: blocksparse, flex, reference\\)",
    ):
        make_backend("sdpa", window)
    with pytest.raises(AttentionSpecError, match="attention pattern 'sliding_window'"):
        build_model(
            preset_config("tiny"), AttentionConfig(pattern="sliding_window", params={"window": 4})
        )
    reference = make_backend("reference", window)
    q = k = v = torch.randn(1, 2, 6, 8)
    geo = BatchGeometry(q_len=6, kv_len=6)
    out = reference.attend(q, k, v, reference.prepare(geo, q.dtype), 0.0)
    probs = reference.probs(q, k, geo)
    assert torch.equal(probs[0, 0, 4] > 0, torch.tensor([False, False, False, True, True, False]))
    assert out.shape == (1, 2, 6, 8)


def test_mask_is_built_once_per_batch_and_shared_by_every_layer():
    calls = []

    class Counting(BACKENDS["sdpa"]):
        name = "counting-sdpa"

        def prepare(self, geo, dtype):
            calls.append(geo)
            return super().prepare(geo, dtype)

    BACKENDS["counting-sdpa"] = Counting
    try:
        model = build_model(
            preset_config("tiny", n_layers=4, positional="alibi"),
            AttentionConfig(backend="counting-sdpa"),
        )
        model(torch.randint(0, 512, (2, 8)))
        assert len(calls) == 1
        backends = {id(block.attn.backend) for block in model.decoder.blocks}
        assert backends == {id(model.decoder.backend)}
    finally:
        del BACKENDS["counting-sdpa"]


def test_backend_is_chosen_once_from_the_config():
    model = build_model(preset_config("tiny-encdec"), AttentionConfig(backend="reference"))
    assert model.encoder.backend.name == "reference" and not model.encoder.pattern.causal
    assert model.decoder.backend.name == "reference" and model.decoder.pattern.causal
    assert model.decoder.cross_backend.pattern == Dense(causal=False)
    assert isinstance(model.decoder.blocks[0].attn.backend, Backend)


def test_plain_causal_batch_uses_the_kernels_own_mask():
    backend = make_backend("sdpa", Dense(causal=True))
    plain = backend.prepare(BatchGeometry(q_len=8, kv_len=8), torch.float32)
    assert plain.bias is None and plain.is_causal
    decoding = backend.prepare(BatchGeometry(q_len=2, kv_len=8, q_offset=6), torch.float32)
    assert not decoding.is_causal
    # with 6 cached positions, query 6 sees keys 0..6 and query 7 all 8
    assert torch.equal(
        torch.isfinite(decoding.bias[0, 0]), torch.tensor([[True] * 7 + [False], [True] * 8])
    )


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_attention_maps_for_chosen_layers_and_heads(backend):
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", positional="rope"), AttentionConfig(backend=backend))
    ids = torch.randint(0, 512, (1, 9))
    maps = attention_maps(model, {"input_ids": ids}, layers=[1], heads=[0, 3])
    assert list(maps) == [1]
    probs = maps[1]
    assert probs.shape == (1, 2, 9, 9)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 2, 9))
    assert (probs.triu(diagonal=1) == 0).all()  # causal: nothing above the diagonal
    # the captured probabilities are the ones the layer used: recompute the layer by hand
    block = model.decoder.blocks[1]
    assert block.attn.capture is False  # capture is switched off afterwards
    all_maps = attention_maps(model, {"input_ids": ids})
    assert set(all_maps) == {0, 1} and all_maps[1].shape == (1, 4, 9, 9)
    torch.testing.assert_close(all_maps[1][:, [0, 3]], probs)


def test_attention_maps_equal_manual_softmax():
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", n_layers=1, positional="none"))
    model.eval()
    ids = torch.randint(0, 512, (1, 6))
    x = model.decoder.blocks[0].attn_norm(model.embed(ids))
    attn = model.decoder.blocks[0].attn
    q = attn.q_proj(x).view(1, 6, 4, 16).transpose(1, 2)
    k = attn.k_proj(x).view(1, 6, 4, 16).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) / 4.0
    scores = scores.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(
        attention_maps(model, {"input_ids": ids})[0], scores.softmax(-1), atol=1e-6, rtol=1e-5
    )


def test_attention_maps_of_encoder_and_cross_attention():
    model = build_model(preset_config("tiny-encdec"))
    src, tgt = torch.randint(0, 512, (1, 7)), torch.randint(0, 512, (1, 4))
    inputs = {"src_ids": src, "tgt_ids": tgt}
    enc = attention_maps(model, inputs, stack="encoder", layers=[0])[0]
    cross = attention_maps(model, inputs, stack="cross", layers=[1])[1]
    assert enc.shape == (1, 4, 7, 7) and (enc > 0).all()  # bidirectional
    assert cross.shape == (1, 4, 4, 7)
    with pytest.raises(ValueError, match="has no cross-attention"):
        attention_maps(build_model(preset_config("tiny")), {"input_ids": tgt}, stack="cross")
    with pytest.raises(ValueError, match="layer 5 out of range"):
        attention_maps(model, inputs, stack="encoder", layers=[5])
