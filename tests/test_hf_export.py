"""`attnpipe export --format hf`: a decoder as a transformers folder that
AutoModelForCausalLM and AutoTokenizer load, with attnpipe's logits (fp32, within 1e-5)
and its greedy tokens; a model transformers cannot express is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from models.config import AttentionConfig, ModelConfig
from models.generate import generate
from models.hf import NoEquivalent, hf_style, save_hf
from models.transformer import build_model
from pipeline.data.tokenizer import train_tokenizer

TEXT = [
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "To be, or not to be, that is the question.",
] * 4

STYLES = {
    "gpt2": dict(positional="learned", norm="layernorm", mlp="gelu", bias=True),
    "gpt2-untied": dict(
        positional="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=False
    ),
    "neox": dict(positional="rope", norm="layernorm", mlp="gelu", bias=True, rope_theta=5e4),
    "llama-gqa": dict(
        positional="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        n_kv_heads=2,
        rope_theta=500000.0,
        ffn_multiple_of=16,
    ),
    "llama-bias-untied": dict(
        positional="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=True,
        tie_embeddings=False,
        ffn_multiple_of=16,
        norm_eps=1e-6,
    ),
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(TEXT, vocab_size=300).save(str(path))
    return path


def exported(style: str, tokenizer: Path, folder: Path) -> torch.nn.Module:
    """A tiny attnpipe decoder with every weight random (biases and norms included, so a
    swapped or transposed tensor shows), written as a transformers folder."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=300, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, **STYLES[style]
    )
    model = build_model(cfg, AttentionConfig()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    folder.mkdir()
    assert save_hf(folder, model.state_dict(), cfg, AttentionConfig(), tokenizer)
    return model


@pytest.mark.parametrize("style", list(STYLES))
def test_transformers_loads_the_export_with_attnpipes_logits_and_greedy_tokens(
    style, tokenizer, tmp_path
):
    ours = exported(style, tokenizer, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    names = {"gpt2": "GPT2LMHeadModel", "neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM"}
    assert type(theirs).__name__ == names[style.split("-")[0]]
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Shall I compare thee to a summer's day?"
    ids = torch.tensor([tok(text)["input_ids"]])
    from tokenizers import Tokenizer

    assert ids[0].tolist() == Tokenizer.from_file(str(tokenizer)).encode(text).ids
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    with torch.no_grad():
        want = ours(ids)
        got = theirs(ids).logits
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=0), float((got - want).abs().max())
    theirs.generation_config.eos_token_id = None  # attnpipe's greedy run does not stop either
    greedy = theirs.generate(ids, max_new_tokens=12, do_sample=False)
    assert greedy.tolist() == generate(ours, ids, max_new_tokens=12).tolist()


def test_the_weights_are_all_written_and_no_extra():
    """Every attnpipe parameter lands somewhere in transformers' model, and transformers
    finds no weight missing (load_state_dict strict, the tied head aside)."""
    for style, options in STYLES.items():
        cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=4, **options)
        model = build_model(cfg, AttentionConfig())
        state = model.state_dict()
        from models.hf import hf_config, hf_state

        config = hf_config(cfg, hf_style(cfg, AttentionConfig()), {})
        cls = transformers.CONFIG_MAPPING[config["model_type"]]
        fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
        hf = transformers.AutoModelForCausalLM.from_config(cls(**fields))
        missing, unexpected = hf.load_state_dict(
            hf_state(state, cfg, hf_style(cfg, AttentionConfig())), strict=False
        )
        tied = ["lm_head.weight"] if cfg.tie_embeddings else []
        assert (missing, unexpected) == (tied, []), style
        n_ours = sum(p.numel() for p in model.parameters())
        assert n_ours == sum(p.numel() for p in hf.parameters()), style


@pytest.mark.parametrize(
    "change, attention, message",
    [
        ({"family": "encoder"}, {}, "model.family: encoder: only a decoder exports"),
        ({}, {"pattern": "bigbird", "params": {"block": 16}}, "attention.pattern: bigbird"),
        ({}, {"pattern": "dense", "params": {"prefix": 8}}, "attention.pattern: dense"),
        ({"positional": "alibi"}, {}, "model.positional: alibi"),
        ({"positional": "sinusoidal"}, {}, "model.positional: sinusoidal"),
        ({"norm": "rmsnorm"}, {}, "model.norm: rmsnorm with positional learned"),
        ({"mlp": "swiglu"}, {}, 'model.mlp: "swiglu" with positional learned and norm layernorm'),
        ({"positional": "rope", "mlp": "swiglu"}, {}, "GPT-NeoX's MLP is GELU"),
        ({"positional": "rope", "norm": "rmsnorm"}, {}, "LLaMA's MLP is SwiGLU"),
        ({"bias": False}, {}, "model.bias: false with positional learned"),
        ({"n_kv_heads": 2}, {}, "model.n_kv_heads: 2 with positional learned and norm layernorm"),
        ({"positional": "rope", "n_kv_heads": 1}, {}, "GPT-NeoX has no GQA"),
        (
            {"positional": "rope", "norm": "rmsnorm", "mlp": "swiglu"},
            {"adaptive_span": {"max_span": 32}},
            "attention.adaptive_span",
        ),
    ],
)
def test_what_transformers_cannot_express_is_refused_naming_the_setting(change, attention, message):
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=4, **change)
    with pytest.raises(NoEquivalent) as err:
        hf_style(cfg, AttentionConfig(**attention))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_the_export_command_refuses_before_writing_anything(tmp_path):
    """A checkpoint of a BigBird model: `export --format hf` is one line naming the pattern,
    and --out is never created."""
    from pipeline.config import load_spec, resolved_yaml
    from pipeline.errors import UserError
    from pipeline.train.export import export

    root = Path(__file__).resolve().parent.parent
    spec = load_spec(
        root / "jobs" / "decoder-tiny.yaml",
        ["attention.pattern=bigbird", "attention.backend=blocksparse", "data.seq_len=64"],
    )
    folder = tmp_path / "run" / "checkpoint-00000004"
    folder.mkdir(parents=True)
    import yaml

    meta = {"step": 4, "world_size": 1, "zero_stage": 0, "data_fingerprint": "x"}
    meta["spec"] = yaml.safe_load(resolved_yaml(spec))
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / "rank-00000.done").write_text("ok\n")
    with pytest.raises(UserError) as err:
        export(str(folder), tmp_path / "out", fmt="hf")
    assert str(err.value).startswith("--format hf: attention.pattern: bigbird")
    assert not (tmp_path / "out").exists()
