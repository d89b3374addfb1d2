"""Hugging Face T5 checkpoints (`T5ForConditionalGeneration`) -> tljax `T5` trees.

Names (tljax.models.t5): 'shared' -> embed; '{encoder,decoder}.block.{i}.layer.{j}' ->
'{encoder,decoder}/layers_{i}' with layer 0 SelfAttention.{q,k,v,o} -> attn/{q,k,v,o}
and its layer_norm -> attn_norm; decoder layer 1 EncDecAttention -> cross_attn (+
cross_attn_norm); the last layer's DenseReluDense.{wi,wo} -> mlp/{up,down}, or gated
{wi_0,wi_1,wo} -> mlp/{gate,up,down}, and its layer_norm -> mlp_norm; block 0's
SelfAttention.relative_attention_bias -> '{stack}/relative_attention_bias';
final_layer_norm -> norm; lm_head -> head (untied only). Linear weights are transposed.
The stacks' copies of the shared embedding ('*.embed_tokens.weight') are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from tljax.models import t5 as t5_lib
from tljax.pretrained import hf_lm

_CONFIG_FIELDS = {  # HF config.json field -> T5 field
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "num_layers": "num_layers",
    "num_decoder_layers": "num_decoder_layers",
    "num_heads": "num_heads",
    "d_kv": "head_dim",
    "d_ff": "intermediate_size",
    "feed_forward_proj": "feed_forward_proj",
    "relative_attention_num_buckets": "relative_attention_num_buckets",
    "relative_attention_max_distance": "relative_attention_max_distance",
    "layer_norm_epsilon": "layer_norm_eps",
    "dropout_rate": "dropout",
    "pad_token_id": "pad_token_id",
    "eos_token_id": "eos_token_id",
    "decoder_start_token_id": "decoder_start_token_id",
}


def config_to_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """HF T5 config.json -> `T5` keyword arguments.

    The output scale follows transformers: `scale_decoder_outputs` when the config has
    it (transformers 5), else `tie_word_embeddings` (True unless the config says False).
    """
    if config.get("model_type", "t5") != "t5":
        raise ValueError(f"model_type={config['model_type']!r}: expected a 't5' config.")
    kwargs = {ours: config[theirs] for theirs, ours in _CONFIG_FIELDS.items()
              if config.get(theirs) is not None}
    t5_lib.parse_feed_forward_proj(kwargs.get("feed_forward_proj", "relu"))
    tied = config.get("tie_word_embeddings", True) is not False
    kwargs["tie_word_embeddings"] = tied
    kwargs["scale_decoder_outputs"] = bool(config.get("scale_decoder_outputs", tied))
    return kwargs


def _attention(rows: list, ours: str, theirs: str) -> None:
    for n in "qkvo":
        rows.append((f"{ours}/{n}/kernel", f"{theirs}.{n}.weight", True))


def _rows(model: t5_lib.T5) -> list[hf_lm.Row]:
    _, gated = t5_lib.parse_feed_forward_proj(model.feed_forward_proj)
    mlp = {"gate": "wi_0", "up": "wi_1", "down": "wo"} if gated else {"up": "wi", "down": "wo"}
    rows = [("embed/embedding", "shared.weight", False)]
    stacks = (("encoder", model.num_layers), ("decoder", model.num_decoder_layers
                                              or model.num_layers))
    for stack, depth in stacks:
        rows += [(f"{stack}/relative_attention_bias/embedding",
                  f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", False),
                 (f"{stack}/norm/scale", f"{stack}.final_layer_norm.weight", False)]
        for i in range(depth):
            ours, theirs = f"{stack}/layers_{i}", f"{stack}.block.{i}.layer"
            rows.append((f"{ours}/attn_norm/scale", f"{theirs}.0.layer_norm.weight", False))
            _attention(rows, f"{ours}/attn", f"{theirs}.0.SelfAttention")
            last = 1
            if stack == "decoder":
                rows.append((f"{ours}/cross_attn_norm/scale", f"{theirs}.1.layer_norm.weight",
                             False))
                _attention(rows, f"{ours}/cross_attn", f"{theirs}.1.EncDecAttention")
                last = 2
            rows.append((f"{ours}/mlp_norm/scale", f"{theirs}.{last}.layer_norm.weight", False))
            for n, hf_n in mlp.items():
                rows.append((f"{ours}/mlp/{n}/kernel",
                             f"{theirs}.{last}.DenseReluDense.{hf_n}.weight", True))
    if not model.tie_word_embeddings:
        rows.append(("head/kernel", "lm_head.weight", True))
    return rows


def convert_hf(state: Mapping[str, np.ndarray], config: Mapping[str, Any]
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """HF T5 state dict + config.json -> ({'params': tree}, T5 kwargs)."""
    kwargs = config_to_kwargs(config)
    state = dict(state)
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state.pop("encoder.embed_tokens.weight")
    kwargs["tie_word_embeddings"] = not hf_lm.untied(
        state, "lm_head.weight", "shared.weight", kwargs["tie_word_embeddings"])
    ignore = [r"^(encoder|decoder)\.embed_tokens\.weight$", r"^lm_head\.weight$"]
    variables = hf_lm.convert(state, _rows(t5_lib.make(**kwargs)), "T5 checkpoint", ignore)
    return variables, kwargs
