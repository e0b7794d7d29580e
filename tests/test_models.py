"""The transformer family: shapes, causality, cross-attention, positional encodings, GQA,
KV-cache generation, and that a test-size model can learn."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from models import (
    AttentionConfig,
    DecoderLM,
    EncoderDecoderLM,
    EncoderMLM,
    build_model,
    preset_config,
)
from models.attention import BatchGeometry, Dense, make_backend
from models.generate import generate, generate_seq2seq
from models.layers import Attention, AttentionBatch
from models.positional import alibi_slopes, apply_rope, rope_cos_sin, sinusoidal_table

POSITIONALS = ["sinusoidal", "learned", "rope", "alibi", "none"]
FAMILIES = {"decoder": "tiny", "encoder": "tiny-encoder", "encoder_decoder": "tiny-encdec"}
VOCAB = 512


def tiny(family: str = "decoder", backend: str = "sdpa", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = preset_config(FAMILIES[family], **overrides)
    return build_model(cfg, AttentionConfig(backend=backend)).eval()


def tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, shape, generator=g)


def run(model: torch.nn.Module, ids: torch.Tensor, **kw) -> torch.Tensor:
    if isinstance(model, EncoderDecoderLM):
        return model(ids, ids[:, :7], **kw)
    return model(ids, **kw)


@pytest.mark.parametrize(
    "family,positional,norm,mlp",
    [
        (fam, pos, norm, mlp)
        for fam, pos in itertools.product(FAMILIES, POSITIONALS)
        for norm, mlp in [("layernorm", "gelu")]
    ]
    + [(fam, "rope", "rmsnorm", "swiglu") for fam in FAMILIES],
)
def test_shapes_every_family_and_positional_encoding(family, positional, norm, mlp):
    model = tiny(family, positional=positional, norm=norm, mlp=mlp)
    ids = tokens(3, 11)
    logits = run(model, ids)
    expected_len = 7 if family == "encoder_decoder" else 11
    assert logits.shape == (3, expected_len, VOCAB)
    assert torch.isfinite(logits).all()
    assert isinstance(
        model,
        {"decoder": DecoderLM, "encoder": EncoderMLM, "encoder_decoder": EncoderDecoderLM}[family],
    )


@pytest.mark.parametrize("positional", POSITIONALS)
def test_decoder_is_causal_exactly(positional):
    model = tiny(positional=positional)
    ids = tokens(2, 24)
    changed = ids.clone()
    changed[:, 15] = (changed[:, 15] + 1) % VOCAB
    a, b = model(ids), model(changed)
    assert torch.equal(a[:, :15], b[:, :15]), "a future token changed earlier logits"
    assert not torch.equal(a[:, 15:], b[:, 15:]), "the changed token had no effect at all"


@pytest.mark.parametrize("positional", POSITIONALS)
def test_encoder_is_bidirectional(positional):
    model = tiny("encoder", positional=positional)
    ids = tokens(2, 16)
    changed = ids.clone()
    changed[:, 12] = (changed[:, 12] + 1) % VOCAB
    assert not torch.allclose(model(ids)[:, :12], model(changed)[:, :12])


def test_encoder_decoder_output_depends_on_source_through_cross_attention():
    model = tiny("encoder_decoder")
    src, tgt = tokens(2, 12), tokens(2, 6, seed=2)
    other_src = src.clone()
    other_src[:, 3] = (other_src[:, 3] + 7) % VOCAB
    base = model(src, tgt)
    assert not torch.allclose(base, model(other_src, tgt), atol=1e-6)
    # with cross-attention's output projection zeroed, the source no longer matters
    with torch.no_grad():
        for block in model.decoder.blocks:
            block.cross_attn.out_proj.weight.zero_()
            block.cross_attn.out_proj.bias.zero_()
    assert torch.allclose(model(src, tgt), model(other_src, tgt), atol=1e-6)


def test_key_padding_masks_hide_padded_tokens():
    for family in FAMILIES:
        model = tiny(family)
        ids = tokens(2, 10)
        keep = torch.ones(2, 10, dtype=torch.bool)
        keep[:, 7:] = False  # the last 3 tokens are padding
        garbage = ids.clone()
        garbage[:, 7:] = tokens(2, 3, seed=9)
        if family == "encoder_decoder":
            tgt = tokens(2, 5, seed=3)
            a = model(ids, tgt, src_padding_mask=keep)
            b = model(garbage, tgt, src_padding_mask=keep)
            torch.testing.assert_close(a, b)
        else:
            a = model(ids, key_padding_mask=keep)[:, :7]
            b = model(garbage, key_padding_mask=keep)[:, :7]
            torch.testing.assert_close(a, b)


def test_left_padding_gives_finite_outputs_and_gradients():
    model = tiny("encoder").train()
    ids = tokens(2, 8)
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[0, :8] = False  # one row is all padding: no key to attend
    logits = model(ids, key_padding_mask=keep)
    logits.sum().backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_rope_scores_depend_only_on_relative_offset():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)

    def score(m: int, n: int) -> torch.Tensor:
        cq, sq = rope_cos_sin(torch.tensor([m]), 16, 10000.0)
        ck, sk = rope_cos_sin(torch.tensor([n]), 16, 10000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum(-1)

    for m, n, shift in [(5, 2, 11), (0, 9, 40), (100, 3, 7)]:
        torch.testing.assert_close(score(m, n), score(m + shift, n + shift), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 3), atol=1e-3)


def test_rope_preserves_norms():
    x = torch.randn(2, 3, 7, 8)
    cos, sin = rope_cos_sin(torch.arange(7), 8, 10000.0)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


def test_alibi_slopes_follow_the_paper():
    # Press et al. 2022: for 8 heads, 1/2, 1/4, ..., 1/256
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 6 heads: the 4 slopes of 4 heads, then every other slope of 8 heads
    expected = [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    torch.testing.assert_close(alibi_slopes(6), torch.tensor(expected))


def test_alibi_bias_reaches_scores():
    model = tiny(positional="alibi")
    geo = model.decoder.attention_batch(4, 0, None, torch.zeros(1)).geo
    bias = model.decoder.backend.prepare(geo, torch.float32).bias  # (1, H, 4, 4)
    slope = alibi_slopes(4)[1]
    assert bias[0, 1, 3, 0] == pytest.approx(-3 * slope.item())
    assert bias[0, 1, 0, 3] == float("-inf")


def test_sinusoidal_table_matches_formula():
    table = sinusoidal_table(50, 16)
    pos, i = 17, 3
    assert table[pos, 2 * i].item() == pytest.approx(
        torch.sin(torch.tensor(pos / 10000 ** (2 * i / 16))).item(), abs=1e-6
    )
    assert table[pos, 2 * i + 1].item() == pytest.approx(
        torch.cos(torch.tensor(pos / 10000 ** (2 * i / 16))).item(), abs=1e-6
    )


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_grouped_query_attention_equals_mha_with_repeated_kv_weights(n_kv_heads):
    torch.manual_seed(0)
    gqa_cfg = preset_config("tiny", n_heads=4, n_kv_heads=n_kv_heads)
    mha_cfg = preset_config("tiny", n_heads=4)
    backend = make_backend("sdpa", Dense(causal=True))
    gqa, mha = Attention(gqa_cfg, backend), Attention(mha_cfg, backend)
    groups, hd = 4 // n_kv_heads, gqa_cfg.head_dim
    with torch.no_grad():
        for name in ("q_proj", "out_proj"):
            getattr(mha, name).load_state_dict(getattr(gqa, name).state_dict())
        for name in ("k_proj", "v_proj"):
            src = getattr(gqa, name)
            w = src.weight.view(n_kv_heads, hd, -1).repeat_interleave(groups, 0).reshape(-1, 64)
            b = src.bias.view(n_kv_heads, hd).repeat_interleave(groups, 0).reshape(-1)
            getattr(mha, name).weight.copy_(w)
            getattr(mha, name).bias.copy_(b)
    assert gqa.k_proj.weight.shape[0] == n_kv_heads * hd < mha.k_proj.weight.shape[0]
    x = torch.randn(2, 9, 64)
    geo = BatchGeometry(q_len=9, kv_len=9)
    batch = AttentionBatch(geo, backend.prepare(geo, x.dtype))
    torch.testing.assert_close(gqa(x, batch), mha(x, batch), atol=1e-6, rtol=1e-5)


def test_gqa_model_trains_with_fewer_kv_parameters():
    model = tiny(n_kv_heads=1)
    assert model.decoder.blocks[0].attn.k_proj.weight.shape == (16, 64)
    loss = F.cross_entropy(model(tokens(2, 8)).flatten(0, 1), tokens(2, 8, seed=5).flatten())
    loss.backward()
    assert model.decoder.blocks[0].attn.k_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_sdpa_backend_equals_reference(backend):
    ref = tiny(backend="reference", positional="alibi")
    other = tiny(backend=backend, positional="alibi")
    other.load_state_dict(ref.state_dict())
    ids = tokens(2, 13)
    torch.testing.assert_close(other(ids), ref(ids), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("positional", POSITIONALS)
def test_kv_cache_generation_equals_generation_without_cache(positional):
    model = tiny(positional=positional, n_kv_heads=2)
    prompt = tokens(2, 5)
    greedy_cached = generate(model, prompt, 12, use_cache=True)
    greedy_plain = generate(model, prompt, 12, use_cache=False)
    assert greedy_cached.shape == (2, 17)
    assert torch.equal(greedy_cached, greedy_plain)
    assert torch.equal(greedy_cached[:, :5], prompt)
    sampled = [
        generate(
            model,
            prompt,
            12,
            temperature=0.8,
            top_k=20,
            use_cache=c,
            generator=torch.Generator().manual_seed(3),
        )
        for c in (True, False)
    ]
    assert torch.equal(sampled[0], sampled[1])


def test_kv_cache_logits_equal_full_forward():
    model = tiny(positional="rope")
    ids = tokens(1, 10)
    full = model(ids)
    cache = model.new_cache()
    steps = [model(ids[:, :4], cache=cache)] + [
        model(ids[:, i : i + 1], cache=cache) for i in range(4, 10)
    ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    assert cache.length == 10


@pytest.mark.parametrize("positional", ["sinusoidal", "rope", "alibi"])
def test_seq2seq_kv_cache_generation_equals_generation_without_cache(positional):
    model = tiny("encoder_decoder", positional=positional)
    src = tokens(2, 9)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, 6:] = False
    outs = [
        generate_seq2seq(model, src, 10, bos_id=1, src_padding_mask=keep, use_cache=c)
        for c in (True, False)
    ]
    assert outs[0].shape == (2, 11)
    assert torch.equal(outs[0], outs[1])


def test_top_k_one_is_greedy_and_eos_stops():
    model = tiny()
    prompt = tokens(1, 4)
    greedy = generate(model, prompt, 6)
    top1 = generate(
        model, prompt, 6, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(greedy, top1)
    eos = int(greedy[0, 4])  # the first generated token
    stopped = generate(model, prompt, 6, eos_id=eos)
    assert stopped.shape[1] == 5 and stopped[0, -1] == eos


@pytest.mark.parametrize("family", ["decoder", "encoder_decoder", "encoder"])
def test_complete_streams_the_text_it_returns(family):
    """`attnpipe generate` and the MLflow model's text: pieces as they come, which join to
    the whole (a character over several byte-level tokens comes out whole), the tokens
    `generate` picks, and an encoder's mask filled."""
    from models.generate import MASK, complete
    from pipeline.data.tokenizer import train_tokenizer

    tok = train_tokenizer(["caf\u00e9 na\u00efve \u00fcber \u4e2d\u6587 the quick fox"] * 8, 300)
    model = tiny(family, vocab_size=tok.get_vocab_size())
    prompt = f"the quick {MASK} fox" if family == "encoder" else "the quick"
    pieces: list[str] = []
    text = complete(model, tok, family, prompt, 12, on_text=pieces.append)
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces[:-1])
    ids = torch.tensor([tok.encode(prompt).ids])
    if family == "decoder":
        want = generate(model, ids, 12, eos_id=tok.token_to_id("<|endoftext|>"))[0, ids.shape[1] :]
    elif family == "encoder_decoder":
        bos, eod = tok.token_to_id("<|bos|>"), tok.token_to_id("<|endoftext|>")
        want = generate_seq2seq(model, ids, 12, bos, eos_id=eod)[0, 1:]
    else:
        at = ids[0] == tok.token_to_id(MASK)
        want = torch.where(at, model(ids).argmax(-1)[0], ids[0])
        assert len(pieces) == 1
    eod = tok.token_to_id("<|endoftext|>")
    assert text == tok.decode([int(t) for t in want if int(t) != eod])
    sampled = [complete(model, tok, family, prompt, 12, 1.0, 5, seed=3) for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed repeats


def test_learned_positions_refuse_sequences_beyond_max_seq_len():
    model = tiny(max_seq_len=16)
    with pytest.raises(ValueError, match="exceeds max_seq_len=16"):
        model(tokens(1, 17))


def test_weight_tying_is_optional():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed.tokens.weight
    assert untied.lm_head.weight is not untied.embed.tokens.weight
    n = sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters())
    assert n == VOCAB * 64


def test_gpt2_scaled_initialisation():
    cfg = preset_config("tiny", n_layers=8, d_model=256, n_heads=4, vocab_size=4096)
    torch.manual_seed(0)
    model = build_model(cfg)
    block = model.decoder.blocks[0]
    assert block.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.attn.out_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert block.mlp.down.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert block.attn.q_proj.bias.abs().sum() == 0


def test_dropout_is_active_only_in_training():
    model = tiny(dropout=0.5)
    ids = tokens(2, 8)
    torch.testing.assert_close(model(ids), model(ids))
    model.train()
    assert not torch.allclose(model(ids), model(ids))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_test_size_model_overfits_a_fixed_batch(family):
    torch.manual_seed(0)
    model = tiny(family, positional="rope").train()
    ids = tokens(4, 33, seed=11)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(150):
        if family == "decoder":
            logits, target = model(ids[:, :-1]), ids[:, 1:]
        elif family == "encoder":
            # masked LM: a fixed 25% of positions replaced by token 0, predicted from context
            masked = torch.arange(33) % 4 == 1
            logits = model(ids.masked_fill(masked, 0))[:, masked]
            target = ids[:, masked]
        else:
            logits, target = model(ids[:, :16], ids[:, 16:-1]), ids[:, 17:]
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 5.5  # about ln(512) = 6.24 at initialisation
    assert loss.item() < 0.2, f"{family} did not overfit: loss {loss.item():.3f}"


@pytest.mark.parametrize("family", ["decoder", "encoder", "encoder_decoder"])
def test_chunked_loss_and_tiled_mlp_equal_the_whole_sequence(family):
    """loss_chunk_tokens (the head and cross-entropy by chunks, never the whole logits) and
    mlp_chunk_tokens (tiled MLP) give the same loss and gradients as computing it at once,
    with chunks that do not divide the tokens, ignored targets and tied weights."""
    from models.config import ModelConfig
    from models.transformer import build_model, set_loss_chunking, set_mlp_chunking

    cfg = ModelConfig(
        family=family, vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=64
    )
    torch.manual_seed(0)
    model = build_model(cfg).double()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (2, 40), generator=g)
    labels = torch.randint(0, 97, (2, 40), generator=g)
    labels[0, 5:9] = -100
    args = (ids, ids[:, :30]) if family == "encoder_decoder" else (ids,)
    if family == "encoder_decoder":
        labels = labels[:, :30]

    def loss_and_grads():
        model.zero_grad()
        loss = model(*args, labels=labels)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    # the reference: autograd's cross-entropy over the whole logits
    model.zero_grad()
    logits = model(*args)
    expected = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
    )
    expected.backward()
    autograd = {n: p.grad.clone() for n, p in model.named_parameters()}
    loss, grads = loss_and_grads()  # the fused head and loss (models/loss.py)
    assert torch.allclose(loss, expected, rtol=1e-12)
    for n, grad in autograd.items():
        assert torch.allclose(grads[n], grad, rtol=1e-9, atol=1e-12), n
    set_loss_chunking(model, 7)
    set_mlp_chunking(model, 9)
    chunked, chunked_grads = loss_and_grads()
    assert torch.allclose(chunked, loss, rtol=1e-12)
    for n, grad in grads.items():
        assert torch.allclose(chunked_grads[n], grad, rtol=1e-9, atol=1e-12), n
    assert torch.allclose(model(*args), logits.detach(), rtol=1e-12, atol=1e-14)  # no labels
