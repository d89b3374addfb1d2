"""Model families and the one factory that builds a runnable model.

`config.model_name` picks a family (a backbone), `config.model` holds its arguments; the
task (`tljax.tasks`) supplies the head, attached under `head` by `Model`:

    model = models.build("vit", {"variant": "B/16"}, head=LinearHead(10))
    logits = model.apply(variables, models.inputs_of(model, batch), train=False)

Every backbone is a Flax Linen module called as `backbone(inputs, train=False)` that returns
`(features, out)` (see `tljax.models.model`), declares `blocks()` - regexes over parameter
paths, one per block group, ordered from the input towards the head; freeze presets and
layer-wise learning-rate decay are written in terms of these groups - and `inputs`, the
batch keys it consumes.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from tljax.models.layers import LinearHead
from tljax.models.model import HEAD, Model

__all__ = ["HEAD", "FAMILIES", "LinearHead", "Model", "build", "build_backbone", "classifier",
           "from_config", "inputs_of", "json_kwargs", "model_fields"]

# name -> module exposing `make(**kwargs) -> nn.Module`. Imported lazily so a
# ViT run never imports BERT code.
FAMILIES = {
    "vit": "tljax.models.vit",
    "resnet": "tljax.models.resnet",  # torchvision-style v1 (ResNet-18/50)
    "resnetv2": "tljax.models.resnetv2",  # BiT: group norm + weight standardisation
    "vgg": "tljax.models.vgg",
    "efficientnet_lite": "tljax.models.efficientnet",
    "bert": "tljax.models.bert",
    "ge2e": "tljax.models.ge2e",  # speaker encoder; returns (embedding, out)
    "gpt2": "tljax.models.gpt2",  # decoder LMs return (features, out); see tljax.models.lm
    "llama": "tljax.models.llama",
    "t5": "tljax.models.t5",
}


def _family(name: str) -> Any:
    if name not in FAMILIES:
        from tljax.config import ConfigError, closest

        raise ConfigError(f"Unknown model_name {name!r}{closest(name, FAMILIES)}; known: "
                          f"{', '.join(sorted(FAMILIES))}.")
    return importlib.import_module(FAMILIES[name])


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """The backbone of family `name` with keyword arguments `kwargs`."""
    return _family(name).make(**kwargs)


def build(name: str, model_kwargs: dict[str, Any] | None = None, *,
          head: nn.Module | None = None, head_input: str | tuple[str, ...] | None = None,
          dtype: Any = None) -> Model:
    """Backbone `name(**model_kwargs)` computing in `dtype` (None: its default), plus `head`."""
    kwargs = dict(model_kwargs or {})
    if dtype is not None and jnp.dtype(dtype) != jnp.float32:
        kwargs["dtype"] = jnp.dtype(dtype)
    return Model(backbone=build_backbone(name, **kwargs), head=head, head_input=head_input)


def classifier(name: str, num_classes: int | None = None, *, head_zeroinit: bool = True,
               dtype: Any = None, **model_kwargs: Any) -> Model:
    """Backbone `name(**model_kwargs)` with a linear head of `num_classes` (None: no head)."""
    head = None
    if num_classes:
        head = LinearHead(num_classes, head_zeroinit, jnp.dtype(dtype or jnp.float32))
    return build(name, model_kwargs, head=head, dtype=dtype)


def from_config(config: Any, task: Any) -> Any:
    """The model a config trains: backbone, the task's head, compute dtype, adapters.

    The one place that turns `config.model_name`, `config.model`, `config.compute_dtype`,
    the task and a `lora(...)` freeze preset into a module; the trainer and the tools
    (predict, inspect_params) all call it. The head is `task.head_for(backbone, dtype)`
    (a language model's tasks attach its own LM head). With LoRA the result is a `lora.LoRA` wrapper
    whose variables also hold the adapters (`add_adapters`).
    """
    from tljax import freeze
    from tljax.models import lora

    kwargs = json_kwargs(dict(config.get("model") or {}))
    dtype = config.get("compute_dtype") or "float32"
    if jnp.dtype(dtype) != jnp.float32:
        kwargs["dtype"] = jnp.dtype(dtype)
    backbone = build_backbone(config["model_name"], **kwargs)
    model = Model(backbone=backbone, head=task.head_for(backbone, jnp.dtype(dtype)),
                  head_input=task.head_input)
    options = freeze.lora_options(config)
    return lora.LoRA(model, **options) if options else model


def json_kwargs(value: Any) -> Any:
    """Model arguments read back from JSON (config.json): lists become tuples (patch_size)."""
    if isinstance(value, list):
        return tuple(json_kwargs(v) for v in value)
    if isinstance(value, dict):
        return {k: json_kwargs(v) for k, v in value.items()}
    return value


def inputs_of(model: Any, batch: dict[str, Any]) -> Any:
    """The part of `batch` the model consumes: one array, or a dict for several keys."""
    keys = model.inputs
    if len(keys) == 1:
        if keys[0] not in batch:
            raise KeyError(f"The model reads batch[{keys[0]!r}], but the batch has "
                           f"{sorted(batch)}; the pp string must produce it.")
        return batch[keys[0]]
    return {k: batch[k] for k in keys if k in batch}


def model_fields(name: str) -> set[str]:
    """Names `config.model` may set for family `name`: the arguments of its `make`
    plus the fields of the module class `make` is annotated to return."""
    module = _family(name)
    signature = inspect.signature(module.make)
    fields = {p.name for p in signature.parameters.values() if p.kind != p.VAR_KEYWORD}
    cls = getattr(module, str(signature.return_annotation), None)
    if dataclasses.is_dataclass(cls):
        fields |= {f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")}
    return fields
