"""What a task is: the part of a run that knows what is being predicted.

The trainer knows nothing of labels, accuracy or argmax; it asks the task (chosen by
`config.task.name`, options from the rest of `config.task`):

  head(dtype)                 the module attached to the backbone under the name `head`;
  head_for(backbone, dtype)   the same, for heads that mirror the backbone (an LM's output
                              layer: vocabulary, tied embedding); default head(dtype);
  head_input                  what the head reads: None (the backbone's features), a key
                              of its named outputs ('tokens' for a per-token head,
                              'last_token' for a decoder's sequence state) or a tuple of
                              names, passed to the head as a tuple;
  train_batch(batch, rng)     the training batch as the loss should see it (label
                              smoothing, mixup, ...; default: unchanged), inside jit;
  loss(outputs, batch)        the scalar training loss of a batch (masks applied);
  eval_forward(model, variables, inputs)  inside jit, the outputs of an eval batch:
                              model.apply(..., train=False), unless the task decodes
                              (seq2seq generates in eval);
  eval_outputs(outputs, batch)  per eval batch, inside jit: the arrays the metrics need
                              (sums, or predictions); padding examples are marked by
                              batch['mask'] and must not count;
  metrics()                   a host-side accumulator: `update(arrays)` per batch,
                              `result()` -> {name: float} over the whole eval split;
  main_metric                 the name of the result that matters: the `expected`
                              comparison, curves.png and best-checkpoint choices;
  higher_is_better            of the main metric (False for perplexity);
  targets                     batch keys the task reads besides the model's inputs;
  parse_input(text)           a raw input given to tools/predict.py (a file path or a text)
                              as an example for the eval pp;
  generates                   True when predictions are generated text: tools/predict.py
                              then decodes (tljax.generate, stopping at `eos_id`) and
                              gives describe() the new token ids;
  describe(outputs, batch)    per example, the prediction as a line a person reads;
  render(outputs, batch, images)  optional: per example, the input image (as read, before
                              the pp) with the prediction drawn on it, uint8 RGB, for
                              tools/predict.py to save as PNG (dense tasks: boxes, masks);
                              None when the task has nothing to draw.

Outputs may be any pytree of arrays (the detection head returns per-level lists).

A task is one module in tljax/tasks/ registered with `@register("name")`; see
tljax/tasks/classification.py for the model of one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from tljax.data import DatasetInfo
from tljax.errors import InputError

Batch = dict[str, Any]


class Metrics:
    """Sums of per-batch arrays; `result` divides by the sum named 'count'.

    The accumulator of tasks whose metrics are means over examples (accuracy, loss).
    """

    def __init__(self, finalize: Callable[[dict[str, float]], dict[str, float]] | None = None):
        self.totals: dict[str, float] = {}
        self._finalize = finalize

    def update(self, arrays: dict[str, np.ndarray]) -> None:
        for k, v in arrays.items():
            self.totals[k] = self.totals.get(k, 0.0) + float(np.sum(v))

    def result(self) -> dict[str, float]:
        if self._finalize is not None:
            return self._finalize(self.totals)
        count = max(self.totals.get("count", 0.0), 1.0)
        return {**{k: v / count for k, v in self.totals.items() if k != "count"},
                "examples": self.totals.get("count", 0.0)}


class Task:
    """Base class of tasks; see the module docstring for the contract."""

    name: ClassVar[str]
    main_metric: ClassVar[str]
    head_input: str | tuple[str, ...] | None = None
    higher_is_better: ClassVar[bool] = True
    generates: ClassVar[bool] = False
    eos_id: int | None = None  # generating tasks: the token that ends a generated text

    def __init__(self, info: DatasetInfo):
        self.info = info

    @property
    def targets(self) -> tuple[str, ...]:
        raise NotImplementedError

    @property
    def output_names(self) -> list[str]:
        """Names of the head's outputs (classes, tags), written to results.json."""
        return []

    def head(self, dtype: Any = jnp.float32) -> nn.Module:
        raise NotImplementedError

    def train_batch(self, batch: Batch, rng: Any) -> Batch:
        return batch

    def head_for(self, backbone: nn.Module, dtype: Any = jnp.float32) -> nn.Module:
        """The head attached to `backbone` (see the module docstring)."""
        del backbone
        return self.head(dtype)

    def eval_forward(self, model: Any, variables: Any, inputs: Any) -> Any:
        """The outputs `eval_outputs` reads for one eval batch (inside jit)."""
        return model.apply(variables, inputs, train=False)

    def loss(self, outputs: jnp.ndarray, batch: Batch) -> jnp.ndarray:
        raise NotImplementedError

    def eval_outputs(self, outputs: jnp.ndarray, batch: Batch) -> dict[str, jnp.ndarray]:
        raise NotImplementedError

    def metrics(self) -> Any:
        return Metrics()

    def parse_input(self, text: str) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self, outputs: np.ndarray, batch: Batch, top: int = 3) -> list[str]:
        raise NotImplementedError

    def render(self, outputs: Any, batch: Batch, images: list[np.ndarray]
               ) -> list[np.ndarray] | None:
        return None


def displayable(image: np.ndarray) -> np.ndarray:
    """An input image as uint8 RGB: gray repeated, non-uint8 data stretched to 0..255."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.dtype != np.uint8:
        lo, hi = float(image.min()), float(image.max())
        image = np.rint((image - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8)
    return np.repeat(image[..., :1], 3, axis=-1) if image.shape[-1] != 3 else image


def eval_mask(batch: Batch, outputs: jnp.ndarray) -> jnp.ndarray:
    """float32 (B,) weights of real examples: batch['mask'] in eval, all ones in training."""
    mask = batch.get("mask")
    if mask is None:
        return jnp.ones(outputs.shape[:1], jnp.float32)
    return mask.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Registry.

_TASKS: dict[str, type[Task]] = {}


def register(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: makes a Task subclass selectable as `config.task.name = name`."""

    def decorator(cls: type[Task]) -> type[Task]:
        cls.name = name
        _TASKS[name] = cls
        return cls

    return decorator


def task_class(name: str) -> type[Task]:
    from tljax import tasks  # noqa: F401  (imports the built-in tasks, which register)
    from tljax.config import closest

    if name not in _TASKS:
        raise InputError(f"Unknown task {name!r}{closest(name, _TASKS)}; known tasks: "
                         f"{', '.join(sorted(_TASKS))}.")
    return _TASKS[name]


def task_options(name: str) -> set[str]:
    """The options `config.task` may set for task `name` (its constructor's arguments)."""
    parameters = inspect.signature(task_class(name).__init__).parameters
    return {p for p in parameters if p not in ("self", "info")}


def build_task(spec: Any, info: DatasetInfo) -> Task:
    """The task `spec` names ({'name': ..., **options}; a ConfigDict, a dict or None for
    classification) for a dataset described by `info`."""
    options = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec or {})
    name = options.pop("name", "classification")
    cls = task_class(name)
    valid = task_options(name)
    from tljax.config import closest

    for key in options:
        if key not in valid:
            raise InputError(f"Unknown config key 'task.{key}' for task {name!r}"
                             f"{closest(key, valid)}; valid: {', '.join(sorted(valid))}.")
    return cls(info, **options)
