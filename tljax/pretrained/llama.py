"""Hugging Face Llama checkpoints (`LlamaForCausalLM` / `LlamaModel`) <-> tljax `Llama` trees.

Names (tljax.models.llama): 'model.embed_tokens' -> embed, 'model.layers.{i}' ->
layers_{i} with input_layernorm -> attn_norm, self_attn.{q,k,v,o}_proj -> attn/{q,k,v,o},
post_attention_layernorm -> mlp_norm, mlp.{gate,up,down}_proj -> mlp/{gate,up,down},
'model.norm' -> norm, 'lm_head' -> head (untied only). Linear weights are transposed.
q/k rows stay in HF's order (RoPE's rotate-half layout); GGUF files, whose rows
llama.cpp permutes, are undone in tljax.pretrained.gguf before they reach this table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from tljax.models import llama as llama_lib
from tljax.pretrained import hf_lm

# HF config.json field -> Llama field.
_CONFIG_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "hidden_act": "hidden_act",
    "rms_norm_eps": "rms_norm_eps",
    "attention_bias": "attention_bias",
    "mlp_bias": "mlp_bias",
    "attention_dropout": "attention_dropout",
    "initializer_range": "initializer_range",
    "tie_word_embeddings": "tie_word_embeddings",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
}


def config_to_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """HF Llama config.json -> `Llama` keyword arguments.

    RoPE: `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (older);
    only the default rope type is supported.
    """
    if config.get("model_type", "llama") != "llama":
        raise ValueError(f"model_type={config['model_type']!r}: expected a 'llama' config.")
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"RoPE type {rope_type!r} is not supported (only the default "
                         "rotary embedding, without rope_scaling).")
    kwargs = {ours: config[theirs] for theirs, ours in _CONFIG_FIELDS.items()
              if config.get(theirs) is not None}
    kwargs["rope_theta"] = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    if isinstance(kwargs.get("eos_token_id"), list):  # Llama 3 lists several; keep hashable
        kwargs["eos_token_id"] = tuple(kwargs["eos_token_id"])
    if kwargs.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"hidden_act={kwargs['hidden_act']!r}: Llama's MLP is SwiGLU (silu).")
    kwargs.setdefault("tie_word_embeddings", False)
    return kwargs


def _rows(model: llama_lib.Llama) -> list[hf_lm.Row]:
    rows = [("embed/embedding", "model.embed_tokens.weight", False),
            ("norm/scale", "model.norm.weight", False)]
    for i in range(model.num_layers):
        ours, theirs = f"layers_{i}", f"model.layers.{i}"
        rows += [(f"{ours}/attn_norm/scale", f"{theirs}.input_layernorm.weight", False),
                 (f"{ours}/mlp_norm/scale", f"{theirs}.post_attention_layernorm.weight", False)]
        for n in "qkvo":
            rows.append((f"{ours}/attn/{n}/kernel", f"{theirs}.self_attn.{n}_proj.weight", True))
            if model.attention_bias:
                rows.append((f"{ours}/attn/{n}/bias", f"{theirs}.self_attn.{n}_proj.bias", False))
        for n in ("gate", "up", "down"):
            rows.append((f"{ours}/mlp/{n}/kernel", f"{theirs}.mlp.{n}_proj.weight", True))
            if model.mlp_bias:
                rows.append((f"{ours}/mlp/{n}/bias", f"{theirs}.mlp.{n}_proj.bias", False))
    if not model.tie_word_embeddings:
        rows.append(("head/kernel", "lm_head.weight", True))
    return rows


def convert_hf(state: Mapping[str, np.ndarray], config: Mapping[str, Any]
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """HF Llama state dict + config.json -> ({'params': tree}, Llama kwargs).

    An `lm_head.weight` equal to the embedding of a tied config is dropped; one that
    differs makes the model untied (as transformers does). Rotary `inv_freq` buffers of
    old checkpoints are ignored.
    """
    kwargs = config_to_kwargs(config)
    state = hf_lm.add_prefix(state, "model.", "embed_tokens.weight")
    kwargs["tie_word_embeddings"] = not hf_lm.untied(
        state, "lm_head.weight", "model.embed_tokens.weight", kwargs["tie_word_embeddings"])
    ignore = [r"rotary_emb\.inv_freq$", r"^lm_head\.weight$"]
    variables = hf_lm.convert(state, _rows(llama_lib.make(**kwargs)), "Llama checkpoint",
                              ignore)
    return variables, kwargs


def hf_config(model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """config.json for `LlamaForCausalLM` describing `Llama(**model_kwargs)`."""
    model = llama_lib.make(**model_kwargs)
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
    config = {theirs: fields[ours] for theirs, ours in _CONFIG_FIELDS.items()}
    config["num_key_value_heads"] = model.num_kv_heads or model.num_heads
    config["head_dim"] = model.head_dim or model.hidden_size // model.num_heads
    if isinstance(config["eos_token_id"], tuple):
        config["eos_token_id"] = list(config["eos_token_id"])
    rope = {"rope_type": "default", "rope_theta": float(model.rope_theta)}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **config,
            "rope_parameters": rope, "rope_theta": rope["rope_theta"], "pretraining_tp": 1}


def export_llama_to_hf(variables: Mapping[str, Any], model_kwargs: Mapping[str, Any],
                       out_dir: str, tokenizer_path: str | None = None) -> str:
    """Writes an HF `LlamaForCausalLM` directory (model.safetensors, float32, + config.json,
    + the tokenizer files at `tokenizer_path`); inverse of `convert_hf`. Returns out_dir."""
    params = variables.get("params", variables)
    tensors = hf_lm.export(params, _rows(llama_lib.make(**model_kwargs)), "Llama export")
    return hf_lm.write_hf(out_dir, tensors, hf_config(model_kwargs), tokenizer_path)
