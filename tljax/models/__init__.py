"""Model registry: `config.model.name` picks a family, the other fields are its arguments.

Every model is a Flax Linen module called as `model.apply(variables, inputs,
train=False, head=True)`: with `head=False` it returns the pre-head features.
Each module declares `blocks()`: regexes over parameter paths, one per block
group, ordered from the input to the head; freeze presets and layer-wise
learning-rate decay are written in terms of these groups.

The language models ('gpt2', 'llama', 't5') follow the backbone contract instead:
`model.apply(variables, inputs, train=False) -> (features, out)`, with next-token logits
from `tljax.models.lm.lm_logits` (see tljax/models/lm.py).
"""

from __future__ import annotations

import importlib
from typing import Any

import flax.linen as nn

# name -> module exposing `make(**kwargs) -> nn.Module`. Imported lazily so a
# ViT run never imports BERT code.
_FAMILIES = {
    "vit": "tljax.models.vit",
    "resnet": "tljax.models.resnet",  # torchvision-style v1 (ResNet-18/50)
    "resnetv2": "tljax.models.resnetv2",  # BiT: group norm + weight standardisation
    "vgg": "tljax.models.vgg",
    "efficientnet_lite": "tljax.models.efficientnet",
    "bert": "tljax.models.bert",
    "gpt2": "tljax.models.gpt2",  # decoder LMs return (features, out); see tljax.models.lm
    "llama": "tljax.models.llama",
    "t5": "tljax.models.t5",
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Instantiates the model family `name` with keyword arguments `kwargs`."""
    if name not in _FAMILIES:
        raise ValueError(f"Unknown model {name!r}; known models: {', '.join(sorted(_FAMILIES))}.")
    return importlib.import_module(_FAMILIES[name]).make(**kwargs)


def model_fields(name: str) -> set[str]:
    """Names `config.model` may set for family `name`: the arguments of its `make`
    plus the fields of the module class `make` is annotated to return."""
    import dataclasses
    import inspect

    if name not in _FAMILIES:
        raise ValueError(f"Unknown model {name!r}; known models: {', '.join(sorted(_FAMILIES))}.")
    module = importlib.import_module(_FAMILIES[name])
    signature = inspect.signature(module.make)
    fields = {p.name for p in signature.parameters.values() if p.kind != p.VAR_KEYWORD}
    cls = getattr(module, str(signature.return_annotation), None)
    if dataclasses.is_dataclass(cls):
        fields |= {f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")}
    return fields
