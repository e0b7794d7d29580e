"""Presets, exact parameter counts and FLOPs per token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import PRESETS, build_model, count_params, flops_per_token, preset_config
from models.config import ModelConfig, matmul_params, param_breakdown


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count_formula_equals_the_built_model(name):
    cfg = preset_config(name)
    with torch.device("meta"):  # no memory, no init: a 7B model is sized in a second
        model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_params(cfg)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(n_kv_heads=1),
        dict(n_kv_heads=2, mlp="swiglu", norm="rmsnorm", bias=False),
        dict(tie_embeddings=False, positional="alibi"),
        dict(family="encoder", tie_embeddings=False, bias=False),
        dict(family="encoder_decoder", n_encoder_layers=3, positional="rope", d_ff=100),
    ],
)
def test_parameter_count_formula_holds_across_options(overrides):
    cfg = preset_config("tiny", **overrides)
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_params(cfg)


def test_known_published_sizes():
    # GPT-2 small as released: 124,439,808 parameters (tied embeddings, 1024 positions)
    assert count_params(preset_config("gpt2-small")) == 124_439_808
    # LLaMA-7B: 6,738,415,616 parameters (Touvron et al. 2023)
    assert count_params(preset_config("llama-7b")) == 6_738_415_616
    assert 1.2e9 < count_params(preset_config("gpt3-1.3b")) < 1.4e9


def test_presets_are_small_diffs_on_the_base_config():
    base = ModelConfig()
    for name, diff in PRESETS.items():
        cfg = preset_config(name)
        changed = {k for k in type(base).model_fields if getattr(cfg, k) != getattr(base, k)}
        assert changed <= set(diff), name
    assert preset_config("gpt2-small") == base


def test_swiglu_width_rounds_like_llama():
    assert preset_config("llama-7b").ffn_dim == 11008


def test_flops_per_token_is_6n_plus_attention_term():
    cfg = preset_config("gpt2-small")
    n = matmul_params(cfg)
    # N: every parameter but the embedding lookups, plus the tied output projection
    assert n == count_params(cfg) - 1024 * 768
    attention = 12 * 12 * 12 * 64 * 1024  # 12 * L * H * Q * T
    assert flops_per_token(cfg, 1024) == 6 * n + attention
    # a pattern that computes 1/8 of the pairs pays 1/8 of the attention term
    assert flops_per_token(cfg, 1024, attn_density=0.125) == 6 * n + attention / 8
    with pytest.raises(ValueError):
        flops_per_token(cfg, 1024, attn_density=1.5)


def readme_size_table() -> dict[str, int]:
    """The README's preset table, `| tiny / tiny-encoder | family | 149,248 / 154,048 |`
    rows; "gpt2-small / medium / large" abbreviates gpt2-medium and gpt2-large."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = text.split("| preset | family | params |")[1].split("\n\n")[0]
    sizes = {}
    for row in table.strip().splitlines()[1:]:
        names, _, counts = (cell.strip() for cell in row.strip("|").split("|"))
        names, counts = names.split(" / "), counts.split(" / ")
        stem = names[0].rsplit("-", 1)[0]
        for name, count in zip(names, counts, strict=True):
            full = name if name.startswith(stem) else f"{stem}-{name}"
            sizes[full] = int(count.replace(",", ""))
    return sizes


def test_the_readme_size_table_is_every_preset_built():
    sizes = readme_size_table()
    assert sorted(sizes) == sorted(PRESETS)
    for name, count in sizes.items():
        with torch.device("meta"):
            model = build_model(preset_config(name))
        assert sum(p.numel() for p in model.parameters()) == count, name


def test_breakdown_parts_are_the_built_modules():
    cfg = preset_config("encdec-small")
    parts = param_breakdown(cfg)
    with torch.device("meta"):
        model = build_model(cfg)
    built = {n: p.numel() for n, p in model.named_parameters()}
    assert parts["encoder"] == sum(v for n, v in built.items() if n.startswith("encoder."))
    assert parts["decoder"] == sum(v for n, v in built.items() if n.startswith("decoder."))
    assert parts["decoder"] > parts["encoder"]  # cross-attention


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(KeyError, match="known: tiny"):
        preset_config("gpt5")
