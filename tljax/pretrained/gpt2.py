"""Hugging Face GPT-2 checkpoints (`GPT2LMHeadModel` / `GPT2Model`) <-> tljax `GPT2` trees.

Names (tljax.models.gpt2): 'transformer.wte' -> embed, 'wpe' -> pos_embed, 'h.{i}' ->
layers_{i} with ln_1 -> attn_norm, attn.c_attn -> attn/{q,k,v} (the fused (D, 3D) weight
and bias split into thirds, in that order), attn.c_proj -> attn/o, ln_2 -> mlp_norm,
mlp.c_fc -> mlp/up, mlp.c_proj -> mlp/down, 'ln_f' -> norm. GPT-2's Conv1D weights are
stored (in, out) already: nothing is transposed. The causal-mask buffers ('attn.bias',
'attn.masked_bias') of old checkpoints and a tied 'lm_head.weight' are ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from tljax.models import gpt2 as gpt2_lib
from tljax.pretrained import hf_lm

_CONFIG_FIELDS = {  # HF config.json field -> GPT2 field
    "vocab_size": "vocab_size",
    "n_embd": "hidden_size",
    "n_layer": "num_layers",
    "n_head": "num_heads",
    "n_inner": "intermediate_size",
    "n_positions": "max_position_embeddings",
    "activation_function": "activation",
    "layer_norm_epsilon": "layer_norm_eps",
    "resid_pdrop": "dropout",
    "attn_pdrop": "attention_dropout",
    "initializer_range": "initializer_range",
    "tie_word_embeddings": "tie_word_embeddings",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
}
_QKV = "q", "k", "v"


def config_to_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """HF GPT-2 config.json -> `GPT2` keyword arguments; variants of the attention that
    change its output (inverse-layer-index scaling, unscaled weights, cross-attention)
    are refused."""
    if config.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"model_type={config['model_type']!r}: expected a 'gpt2' config.")
    for key, ok in (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True),
                    ("add_cross_attention", False)):
        if config.get(key, ok) != ok:
            raise ValueError(f"GPT-2 config {key}={config[key]!r} is not supported.")
    kwargs = {ours: config[theirs] for theirs, ours in _CONFIG_FIELDS.items()
              if theirs in config}
    kwargs.setdefault("tie_word_embeddings", True)
    return kwargs


def _rows(model: gpt2_lib.GPT2) -> list[hf_lm.Row]:
    """Rows over HF names in which c_attn is already split into c_attn.{q,k,v}."""
    rows = [("embed/embedding", "transformer.wte.weight", False),
            ("pos_embed/embedding", "transformer.wpe.weight", False)]
    for i in range(model.num_layers):
        ours, theirs = f"layers_{i}", f"transformer.h.{i}"
        names = {"attn_norm": "ln_1", "mlp_norm": "ln_2", "attn/o": "attn.c_proj",
                 "mlp/up": "mlp.c_fc", "mlp/down": "mlp.c_proj",
                 **{f"attn/{n}": f"attn.c_attn.{n}" for n in _QKV}}
        for module, hf_module in names.items():
            leaves = ("scale", "bias") if module.endswith("norm") else ("kernel", "bias")
            for leaf, hf_leaf in zip(leaves, ("weight", "bias"), strict=True):
                rows.append((f"{ours}/{module}/{leaf}", f"{theirs}.{hf_module}.{hf_leaf}", False))
    rows += [("norm/scale", "transformer.ln_f.weight", False),
             ("norm/bias", "transformer.ln_f.bias", False)]
    if not model.tie_word_embeddings:
        rows.append(("head/kernel", "lm_head.weight", True))
    return rows


def convert_hf(state: Mapping[str, np.ndarray], config: Mapping[str, Any]
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """HF GPT-2 state dict + config.json -> ({'params': tree}, GPT2 kwargs)."""
    kwargs = config_to_kwargs(config)
    state = hf_lm.add_prefix(state, "transformer.", "wte.weight")
    split = {}
    for name, value in state.items():
        if ".attn.c_attn." in name:  # (D, 3D) weight / (3D,) bias -> q, k, v thirds
            for n, part in zip(_QKV, np.split(np.asarray(value), 3, axis=-1), strict=True):
                split[name.replace(".c_attn.", f".c_attn.{n}.")] = part
        else:
            split[name] = value
    kwargs["tie_word_embeddings"] = not hf_lm.untied(
        split, "lm_head.weight", "transformer.wte.weight", kwargs["tie_word_embeddings"])
    ignore = [r"\.attn\.(masked_)?bias$", r"^lm_head\.weight$"]
    variables = hf_lm.convert(split, _rows(gpt2_lib.make(**kwargs)), "GPT-2 checkpoint",
                              ignore)
    return variables, kwargs


def hf_config(model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """config.json for `GPT2LMHeadModel` describing `GPT2(**model_kwargs)`."""
    model = gpt2_lib.make(**model_kwargs)
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
    config = {theirs: fields[ours] for theirs, ours in _CONFIG_FIELDS.items()}
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **config,
            "embd_pdrop": model.dropout}


def export_gpt2_to_hf(variables: Mapping[str, Any], model_kwargs: Mapping[str, Any],
                      out_dir: str, tokenizer_path: str | None = None) -> str:
    """Writes an HF `GPT2LMHeadModel` directory (model.safetensors, float32, + config.json,
    + the tokenizer files at `tokenizer_path`); inverse of `convert_hf`. Returns out_dir."""
    params = variables.get("params", variables)
    tensors = hf_lm.export(params, _rows(gpt2_lib.make(**model_kwargs)), "GPT-2 export")
    for suffix in ("weight", "bias"):  # fuse q, k, v back into c_attn
        for name in [k for k in tensors if k.endswith(f".c_attn.q.{suffix}")]:
            parts = [tensors.pop(name.replace(".c_attn.q.", f".c_attn.{n}.")) for n in _QKV]
            tensors[name.replace(".c_attn.q.", ".c_attn.")] = np.concatenate(parts, axis=-1)
    return hf_lm.write_hf(out_dir, tensors, hf_config(model_kwargs), tokenizer_path)
