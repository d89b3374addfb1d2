"""A backbone with a task's head attached under the parameter name `head`.

Backbones (every family in tljax/models/) compute `(features, out)`: the features a head
normally reads (pooled vector, or per-token states) and a dict of named intermediate outputs
(CNN stages, transformer tokens), as big_vision's models return `out`. `Model` calls the
backbone in its own scope (`nn.share_scope`), so the backbone's parameters keep their own
names at the top of the tree ('Transformer/encoderblock_0/...', 'layer1_0/conv1/...') and the
head's live under 'head/...': checkpoints, freeze rules, `dont_load` regexes and LLRD
groups read the same with any head.

    model = Model(backbone=vit.make("B/16"), head=LinearHead(10))
    logits = model.apply(variables, images)                # head(features)
    feats = model.apply(variables, images, head=False)     # what the head reads

`head_input` picks what the head reads: None for the features, a key of `out`
('tokens' for a per-token head), or a tuple of such names ('features' for the
features), passed to the head as a tuple. Heads are called `head(x, train=train)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

HEAD = "^head/"


def select(features: Any, out: dict[str, Any], head_input: str | Sequence[str] | None) -> Any:
    """What a head reads: see the module docstring."""
    if head_input is None:
        return features
    if isinstance(head_input, str):
        names = (head_input,)
    else:
        names = tuple(head_input)
    available = {"features": features, **out}
    missing = [n for n in names if n not in available]
    if missing:
        raise KeyError(f"head_input {missing[0]!r} is not an output of this backbone; it has "
                       f"{sorted(available)}.")
    picked = tuple(available[n] for n in names)
    return picked[0] if isinstance(head_input, str) else picked


class Model(nn.Module):
    """`backbone` + `head`; `__call__(inputs, train, head=True)`; see the module docstring."""

    backbone: nn.Module
    head: nn.Module | None = None
    head_input: str | tuple[str, ...] | None = None

    def setup(self) -> None:
        nn.share_scope(self, self.backbone)

    @property
    def inputs(self) -> tuple[str, ...]:
        """Batch keys the backbone consumes (see `tljax.models.inputs_of`)."""
        return type(self.backbone).inputs

    @property
    def dtype(self) -> Any:
        return getattr(self.backbone, "dtype", jnp.float32)

    def blocks(self) -> list[str]:
        """The backbone's block groups (input to output), then the head."""
        return [*self.backbone.blocks(), HEAD]

    def __call__(self, inputs: Any, train: bool = False, head: bool = True) -> Any:
        features, out = self.backbone(inputs, train=train)
        x = select(features, out, self.head_input)
        if not head or self.head is None:
            return x
        return self.head(x, train=train)
