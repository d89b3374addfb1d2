"""What the Hugging Face language-model converters (GPT-2, Llama, T5) share.

Each family lists its tensors as rows `(tljax name, HF name, transposed)`: a torch
`Linear.weight` (out, in) is a Flax kernel (in, out) transposed; embeddings, norms and
GPT-2's Conv1D weights (already (in, out)) are copied. `convert` reads every row and
fails on any tensor no row (and no `ignore` regex) consumed; `export` is its inverse and
fails on any parameter no row writes. Arrays become float32.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tljax import tree
from tljax.pretrained import common, readers
from tljax.pretrained.info import PretrainedInfo

Row = tuple[str, str, bool]
FAMILIES = ("gpt2", "llama", "t5")  # HF model_type = tljax model name = converter module
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "spiece.model", "generation_config.json")


def add_prefix(state: Mapping[str, Any], prefix: str, probe: str) -> dict[str, Any]:
    """Names of a base-model state dict (e.g. HF `LlamaModel`: 'embed_tokens.weight')
    given the task model's prefix ('model.'), recognised by the tensor `probe`."""
    if probe in state and not any(k.startswith(prefix) for k in state):
        return {prefix + k: v for k, v in state.items()}
    return dict(state)


def untied(state: Mapping[str, Any], head: str, embedding: str, tied_by_config: bool) -> bool:
    """Whether the checkpoint has its own output matrix: `head` present and either the
    config says untied or it differs from `embedding` (transformers then leaves it untied)."""
    if head not in state:
        return False
    return not tied_by_config or not np.array_equal(np.asarray(state[head]),
                                                    np.asarray(state[embedding]))


def convert(state: Mapping[str, Any], rows: Sequence[Row], description: str,
            ignore: Iterable[str] = ()) -> dict[str, Any]:
    """{'params': tree} from an HF state dict through `rows` (see the module docstring)."""
    src = common.SourceWeights(state, description)
    flat = {}
    for ours, theirs, transposed in rows:
        value = np.asarray(src[theirs], np.float32)
        flat[ours] = np.ascontiguousarray(value.T if transposed else value)
    src.check_all_used(ignore)
    return {"params": tree.unflatten(flat)}


def export(params: Mapping[str, Any], rows: Sequence[Row], description: str
           ) -> dict[str, np.ndarray]:
    """HF state dict (float32) from tljax `params` through `rows`; inverse of `convert`."""
    flat = tree.flatten(params)
    wanted = {ours for ours, _, _ in rows}
    missing = sorted(wanted - set(flat))
    unexpected = sorted(set(flat) - wanted)
    if missing or unexpected:
        raise ValueError(f"{description}: the parameter tree does not match the model "
                         f"description; missing {missing[:10]}, unexpected {unexpected[:10]}.")
    out = {}
    for ours, theirs, transposed in rows:
        value = np.asarray(flat[ours], np.float32)
        out[theirs] = np.ascontiguousarray(value.T if transposed else value)
    return out


def tokenizer_file(directory: str | os.PathLike) -> str | None:
    """The directory's tokenizer.json, if any."""
    path = Path(directory) / "tokenizer.json"
    return str(path) if path.exists() else None


def write_hf(out_dir: str | os.PathLike, tensors: Mapping[str, np.ndarray],
             config: Mapping[str, Any], tokenizer_path: str | None = None) -> str:
    """Writes model.safetensors + config.json (+ the tokenizer files found at
    `tokenizer_path`, a tokenizer.json or its directory) into `out_dir`; returns it."""
    from safetensors.numpy import save_file

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    # Older transformers releases refuse safetensors files without metadata format "pt".
    save_file(dict(tensors), os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dict(config), f, indent=2)
    if tokenizer_path is not None:
        source = Path(tokenizer_path)
        files = [source] if source.is_file() else []
        folder = source.parent if source.is_file() else source
        files += [folder / n for n in TOKENIZER_FILES if (folder / n).exists()]
        if not files:
            raise FileNotFoundError(f"No tokenizer files ({', '.join(TOKENIZER_FILES)}) at "
                                    f"{tokenizer_path}.")
        for file in dict.fromkeys(files):
            shutil.copy(file, os.path.join(out_dir, file.name))
    return out_dir


def load_converted(directory: str | os.PathLike, config: Mapping[str, Any]
                   ) -> tuple[dict[str, Any], PretrainedInfo]:
    """An HF GPT-2 / Llama / T5 directory -> (variables with any untied head, info)."""
    family = config.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"model_type={family!r} is not a supported language model "
                         f"({', '.join(FAMILIES)}).")
    converter = importlib.import_module(f"tljax.pretrained.{family}")
    variables, kwargs = converter.convert_hf(readers.read_weights(directory), config)
    return variables, PretrainedInfo(source=os.fspath(directory), model_name=family,
                                     model_kwargs=kwargs,
                                     task="seq2seq" if family == "t5" else "causal_lm",
                                     head_input=("features", "embedding"),
                                     tokenizer_path=tokenizer_file(directory),
                                     max_length=kwargs.get("max_position_embeddings"))
