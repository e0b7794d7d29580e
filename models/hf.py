"""A decoder as a Hugging Face transformers model folder, where transformers has its exact
architecture:

- GPT-2 style (learned positions, LayerNorm, GELU MLP, biases) -> `GPT2LMHeadModel`;
- the same with RoPE (the demo's decoders) -> `GPTNeoXForCausalLM` (sequential residual,
  rotary on the whole head);
- LLaMA style (RoPE, RMSNorm, SwiGLU, any GQA) -> `LlamaForCausalLM`.

The folder holds config.json, model.safetensors (fp32, transformers' parameter names),
the BPE tokenizer as a `PreTrainedTokenizerFast` (tokenizer.json with a
tokenizer_config.json) and generation_config.json, so that
`AutoModelForCausalLM.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)`
load it. Writing it needs no transformers.

Anything transformers cannot express (a sparse pattern, ALiBi, sinusoidal positions,
adaptive span, an encoder or encoder-decoder, a mix of the two styles) is refused with one
line naming the setting: never a silently different model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from models.config import AttentionConfig, ModelConfig
from models.pretrained import WEIGHTS

# the BPE's special tokens (pipeline/data/tokenizer.py): documents end with EOD
EOD, PAD = "<|endoftext|>", "<|pad|>"

# the styles by (positional, norm), and what else each needs: (ModelConfig field, value,
# what transformers has)
STYLE_OF = {
    ("learned", "layernorm"): "gpt2",
    ("rope", "layernorm"): "neox",
    ("rope", "rmsnorm"): "llama",
}
NEEDS: dict[str, list[tuple[str, Any, str]]] = {
    "gpt2": [
        ("mlp", "gelu", "GPT-2's MLP is GELU"),
        ("bias", True, "GPT-2's layers have biases"),
    ],
    "neox": [
        ("mlp", "gelu", "GPT-NeoX's MLP is GELU (LLaMA's SwiGLU goes with RMSNorm)"),
        ("bias", True, "GPT-NeoX's layers have biases"),
    ],
    "llama": [("mlp", "swiglu", "LLaMA's MLP is SwiGLU")],
}
ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "neox": "GPTNeoXForCausalLM",
    "llama": "LlamaForCausalLM",
}


class NoEquivalent(ValueError):
    """The model has a setting no transformers architecture expresses; the message names it."""


def hf_style(cfg: ModelConfig, attention: AttentionConfig) -> str:
    """'gpt2', 'neox' or 'llama': the transformers architecture equal to this model, else
    NoEquivalent naming the first setting that has none."""
    if cfg.family != "decoder":
        raise NoEquivalent(
            f"model.family: {cfg.family}: only a decoder exports to transformers (attnpipe's "
            "encoder blocks are pre-norm, BERT's post-norm)"
        )
    if attention.pattern != "dense" or attention.params:
        raise NoEquivalent(
            f"attention.pattern: {attention.pattern} {attention.params or ''}".rstrip()
            + ": transformers' decoders attend densely"
        )
    if attention.adaptive_span is not None:
        raise NoEquivalent("attention.adaptive_span: transformers has no adaptive span")
    if cfg.positional not in ("learned", "rope"):
        raise NoEquivalent(
            f"model.positional: {cfg.positional}: transformers' GPT-2 takes learned positions, "
            "GPT-NeoX and LLaMA RoPE"
        )
    style = STYLE_OF.get((cfg.positional, cfg.norm))
    if style is None:
        raise NoEquivalent(
            f"model.norm: {cfg.norm} with positional {cfg.positional}: GPT-2 normalises with "
            "LayerNorm"
        )
    context = f"positional {cfg.positional} and norm {cfg.norm}"
    for field, value, reason in NEEDS[style]:
        if getattr(cfg, field) != value:
            raise NoEquivalent(
                f"model.{field}: {json.dumps(getattr(cfg, field))} with {context}: {reason}"
            )
    if style != "llama" and cfg.kv_heads != cfg.n_heads:
        name = "GPT-2" if style == "gpt2" else "GPT-NeoX"
        raise NoEquivalent(f"model.n_kv_heads: {cfg.n_kv_heads} with {context}: {name} has no GQA")
    return style


def hf_config(cfg: ModelConfig, style: str, special: dict[str, int]) -> dict[str, Any]:
    ids = {
        "bos_token_id": special.get("eos"),  # a GPT-style document starts after an EOD
        "eos_token_id": special.get("eos"),
        "pad_token_id": special.get("pad"),
    }
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings}
    common.update(ids, dtype="float32")
    if style == "gpt2":
        return {
            "architectures": [ARCHITECTURES[style]],
            "model_type": "gpt2",
            "n_positions": cfg.max_seq_len,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": cfg.ffn_dim,
            "activation_function": "gelu",  # attnpipe's GELU is exact (erf), not gelu_new
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            "initializer_range": cfg.init_std,
            **common,
        }
    if style == "neox":
        return {
            "architectures": [ARCHITECTURES[style]],
            "model_type": "gpt_neox",
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.ffn_dim,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "hidden_act": "gelu",
            "max_position_embeddings": cfg.max_seq_len,
            "layer_norm_eps": cfg.norm_eps,
            "use_parallel_residual": False,  # attnpipe's blocks: attention, then the MLP
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": cfg.rope_theta,
                "partial_rotary_factor": 1.0,
            },
            "attention_bias": True,
            "attention_dropout": cfg.dropout,
            "hidden_dropout": cfg.dropout,
            "initializer_range": cfg.init_std,
            **common,
        }
    return {
        "architectures": [ARCHITECTURES[style]],
        "model_type": "llama",
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.dropout,
        "initializer_range": cfg.init_std,
        **common,
    }


def hf_state(
    state: dict[str, torch.Tensor], cfg: ModelConfig, style: str
) -> dict[str, torch.Tensor]:
    """attnpipe's decoder weights under transformers' names (GPT-2's Conv1D layers hold
    their weights transposed, and its query, key and value projections as one)."""
    out: dict[str, torch.Tensor] = {}
    if style == "gpt2":
        out["transformer.wte.weight"] = state["embed.tokens.weight"]
        out["transformer.wpe.weight"] = state["embed.positions.embedding.weight"]
        for i in range(cfg.n_layers):
            a, h = f"decoder.blocks.{i}.", f"transformer.h.{i}."
            qkv = [state[f"{a}attn.{p}_proj.weight"] for p in "qkv"]
            out[f"{h}attn.c_attn.weight"] = torch.cat(qkv, dim=0).t()
            out[f"{h}attn.c_attn.bias"] = torch.cat(
                [state[f"{a}attn.{p}_proj.bias"] for p in "qkv"]
            )
            pairs = [("attn_norm", "ln_1"), ("mlp_norm", "ln_2")]
            pairs += [("attn.out_proj", "attn.c_proj"), ("mlp.up", "mlp.c_fc")]
            pairs += [("mlp.down", "mlp.c_proj")]
            for ours, theirs in pairs:
                weight = state[f"{a}{ours}.weight"]
                out[f"{h}{theirs}.weight"] = weight if "norm" in ours else weight.t()
                out[f"{h}{theirs}.bias"] = state[f"{a}{ours}.bias"]
        out["transformer.ln_f.weight"] = state["decoder.norm.weight"]
        out["transformer.ln_f.bias"] = state["decoder.norm.bias"]
    elif style == "neox":
        out["gpt_neox.embed_in.weight"] = state["embed.tokens.weight"]
        H, D = cfg.n_heads, cfg.head_dim
        for i in range(cfg.n_layers):
            a, h = f"decoder.blocks.{i}.", f"gpt_neox.layers.{i}."
            for kind in ("weight", "bias"):  # one projection, laid out head by head: q, k, v
                qkv = [state[f"{a}attn.{p}_proj.{kind}"].reshape(H, D, -1) for p in "qkv"]
                fused = torch.cat(qkv, dim=1).reshape(3 * H * D, -1)
                out[f"{h}attention.query_key_value.{kind}"] = fused.squeeze(-1)
            pairs = [("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")]
            pairs += [("attn.out_proj", "attention.dense"), ("mlp.up", "mlp.dense_h_to_4h")]
            pairs += [("mlp.down", "mlp.dense_4h_to_h")]
            for ours, theirs in pairs:
                for kind in ("weight", "bias"):
                    out[f"{h}{theirs}.{kind}"] = state[f"{a}{ours}.{kind}"]
        out["gpt_neox.final_layer_norm.weight"] = state["decoder.norm.weight"]
        out["gpt_neox.final_layer_norm.bias"] = state["decoder.norm.bias"]
    else:
        out["model.embed_tokens.weight"] = state["embed.tokens.weight"]
        names = [("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")]
        names += [(f"attn.{p}_proj", f"self_attn.{p}_proj") for p in "qkv"]
        names += [("attn.out_proj", "self_attn.o_proj"), ("mlp.gate", "mlp.gate_proj")]
        names += [("mlp.up", "mlp.up_proj"), ("mlp.down", "mlp.down_proj")]
        for i in range(cfg.n_layers):
            a, h = f"decoder.blocks.{i}.", f"model.layers.{i}."
            for ours, theirs in names:
                for kind in ("weight", "bias"):
                    if f"{a}{ours}.{kind}" in state:
                        out[f"{h}{theirs}.{kind}"] = state[f"{a}{ours}.{kind}"]
        out["model.norm.weight"] = state["decoder.norm.weight"]
    if not cfg.tie_embeddings:  # tied: transformers ties lm_head to the embedding itself
        out["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in out.items()}


def save_hf(
    folder: str | Path,
    state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    attention: AttentionConfig,
    tokenizer: str | Path | None,
) -> dict[str, Any]:
    """Write the transformers folder into `folder` (which must exist); NoEquivalent before
    anything is written when the model has no transformers architecture."""
    from safetensors.torch import save_file

    style = hf_style(cfg, attention)
    folder = Path(folder)
    special: dict[str, int] = {}
    if tokenizer is not None:
        vocab = json.loads(Path(tokenizer).read_text())["added_tokens"]
        ids = {t["content"]: t["id"] for t in vocab}
        special = {k: ids[v] for k, v in (("eos", EOD), ("pad", PAD)) if v in ids}
        shutil.copy2(tokenizer, folder / "tokenizer.json")
        tokens = {"eos_token": EOD, "bos_token": EOD, "pad_token": PAD}
        (folder / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "model_max_length": cfg.max_seq_len,
                    "clean_up_tokenization_spaces": False,
                    **{k: v for k, v in tokens.items() if v in ids},
                },
                indent=2,
            )
        )
    save_file(hf_state(state, cfg, style), str(folder / WEIGHTS), metadata={"format": "pt"})
    config = hf_config(cfg, style, special)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return {"architecture": config["architectures"][0]}
