"""Config helpers: argument strings, strict validation, durations in any unit.

Every key a config may hold is listed in `TOP_LEVEL` (and `SECTIONS` for the
nested ones) with what it means, so a typo stops the run before any work with
one line naming the key and the closest valid one, instead of being ignored.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable
from typing import Any

import ml_collections

from tljax.errors import InputError


class ConfigError(InputError):
    """A config that cannot run; the message is one line saying what to change."""


TOP_LEVEL = {
    "seed": "integer seed: fixes initialisation, data order, augmentation and dropout",
    "model_name": "model family: vit, resnet, resnetv2, vgg, efficientnet_lite, bert, gpt2, "
                  "llama, t5, ...",
    "model": "keyword arguments of the model family (checked against its constructor)",
    "init": "pretrained initialisation: source, path, dont_load regexes, arch, step",
    "input": "training data: dataset, split, pp, batch_size, data_dir",
    "eval": "evaluation data: split, pp, batch_size (dataset and data_dir from input)",
    "task": "what is predicted: name (classification, token_classification, ...) + its options",
    "optim": "optimizer: name ('sgd' or 'adamw') plus that optax function's arguments",
    "lr": "base learning rate",
    "lr_schedule": "shape of the learning rate: decay_type (cosine, linear, constant), linear_end",
    "grad_clip_norm": "clip the global norm of trainable gradients to this (None: no clipping)",
    "freeze": "one-line freeze preset used when `schedule` is empty, e.g. 'lp_ft(lp_steps=500)'",
    "schedule": "explicit freeze rules [(regex, None | dict)] or phases [{'start_step', 'rules'}]",
    "llrd": "layer-wise lr decay d: block group l of G gets lr * d^(G-1-l) (None: off)",
    "lr_mults": "[(regex, multiplier)], first match wins: extra lr multiplier per parameter",
    "wd_mults": "[(regex, multiplier)], first match wins: weight-decay multiplier per parameter",
    "unfreeze_warmup_steps": "lr re-warmup of a group unfrozen mid-run (None: warmup length)",
    "cache_features": "linear probe on backbone features computed once into WORKDIR/features",
    "compute_dtype": "'float32' or 'bfloat16' (parameters stay float32)",
    "frozen_dtype": "store parameters that no phase trains in this dtype, e.g. 'bfloat16' "
                    "(None: as initialised)",
    "eval_at_start": "evaluate before the first step too (results.json: initial_eval)",
    "mesh": "list of (axis name, size) for the device mesh, -1 takes the remaining devices",
    "sharding_rules": "list of (regex, 'replicate' | 'fsdp') deciding parameter sharding",
    "keep_checkpoints": "number of checkpoints kept in WORKDIR/checkpoints",
    "expected": "published number this recipe reproduces: metric (a key of the final eval "
                "metrics, compared in %), value, tolerance, source",
}

DURATIONS = ("total", "warmup", "log_every", "eval_every", "checkpoint_every")
UNITS = ("steps", "epochs", "examples")
for _prefix in DURATIONS:
    for _unit in UNITS:
        TOP_LEVEL[f"{_prefix}_{_unit}"] = f"{_prefix.replace('_', ' ')} duration in {_unit}"

SECTIONS = {
    "input": {"dataset", "data_dir", "split", "pp", "batch_size"},
    "eval": {"split", "pp", "batch_size"},
    "init": {"source", "path", "dont_load", "arch", "step"},
    "lr_schedule": {"decay_type", "linear_end"},
    "expected": {"metric", "value", "tolerance", "source"},
}

OPTIMIZERS = ("sgd", "adamw")


def closest(key: str, valid: Iterable[str]) -> str:
    """' (closest valid key: X)' or '' when nothing is close."""
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (closest valid key: {match[0]})" if match else ""


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses 'model=B/16,dataset=cifar10,runlocal' over `defaults`.

    A bare name sets a boolean default to True; values keep the type of their
    default (int, float, bool or str); a value may list paths separated by commas.
    """
    result = ml_collections.ConfigDict(dict(defaults))
    items: list[str] = []
    for item in filter(None, (arg or "").split(",")):
        # 'dataset=textfile:/a.csv,/b.csv': a bare path continues the previous value.
        if items and "=" not in item and "/" in item and "=" in items[-1]:
            items[-1] += "," + item
        else:
            items.append(item)
    for item in items:
        name, has_value, value = item.partition("=")
        if name not in defaults:
            raise ConfigError(f"Unknown config argument {name!r}{closest(name, defaults)}; "
                              f"valid arguments: {', '.join(defaults)}.")
        default = defaults[name]
        if not has_value:
            if not isinstance(default, bool):
                raise ConfigError(f"Config argument {name!r} needs a value: {name}=...")
            result[name] = True
        elif isinstance(default, bool):
            result[name] = value.lower() in ("1", "true", "yes")
        else:
            result[name] = type(default)(value) if default is not None else value
    return result


def _keys_of(section: Any) -> list[str]:
    return list(section.keys()) if hasattr(section, "keys") else []


def validate(config: ml_collections.ConfigDict, model_fields: Iterable[str]) -> None:
    """Raises ConfigError (one line) for unknown keys and conflicting durations."""
    for key in config.keys():
        if key not in TOP_LEVEL:
            raise ConfigError(f"Unknown config key {key!r}{closest(key, TOP_LEVEL)}.")
    for section, valid in SECTIONS.items():
        for key in _keys_of(config.get(section)):
            if key not in valid:
                raise ConfigError(f"Unknown config key '{section}.{key}'"
                                  f"{closest(key, valid)}; valid: {', '.join(sorted(valid))}.")
    model_fields = set(model_fields)
    for key in _keys_of(config.get("model")):
        if key not in model_fields:
            raise ConfigError(f"Unknown config key 'model.{key}' for model_name="
                              f"{config.model_name!r}{closest(key, model_fields)}.")
    optim = dict(config.get("optim") or {})
    name = optim.pop("name", None)
    if name not in OPTIMIZERS:
        raise ConfigError(f"config.optim.name={name!r}: expected one of {', '.join(OPTIMIZERS)}.")
    import optax  # the optimizer's own signature is the list of valid keys

    valid = set(inspect.signature(getattr(optax, name)).parameters) - {"learning_rate"}
    for key in optim:
        if key not in valid:
            raise ConfigError(f"Unknown config key 'optim.{key}' for optax.{name}"
                              f"{closest(key, valid)}.")
    for prefix in DURATIONS:
        given = [f"{prefix}_{u}" for u in UNITS if config.get(f"{prefix}_{u}") is not None]
        if len(given) > 1:
            raise ConfigError(f"Conflicting durations {' and '.join(given)}: set only one "
                              f"(the others to None).")
        if prefix == "total" and not given:
            raise ConfigError("No training duration: set one of total_steps, total_epochs, "
                              "total_examples.")


def steps(config: ml_collections.ConfigDict, prefix: str, *, batch_size: int,
          train_size: int, total: int | None = None) -> int | None:
    """The duration `prefix` in steps, from whichever of steps/epochs/examples is set.

    Fractions round up (a 0.5-step interval is every step); None when unset.
    """
    value = {u: config.get(f"{prefix}_{u}") for u in UNITS}
    if value["steps"] is not None:
        result = int(value["steps"])
    elif value["epochs"] is not None:
        result = int(-(-value["epochs"] * train_size // batch_size))
    elif value["examples"] is not None:
        result = int(-(-value["examples"] // batch_size))
    else:
        return None
    if result < 0 or (prefix != "warmup" and result == 0):
        raise ConfigError(f"{prefix} duration resolves to {result} steps; it must be positive.")
    return min(result, total) if total is not None and prefix != "total" else result


def nullable(kind: type) -> ml_collections.FieldReference:
    """A None default that `--config.key=value` can still override."""
    return ml_collections.config_dict.placeholder(kind)


def add_durations(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Makes every duration field the config leaves unset (`total_steps`, `warmup_epochs`, ...)
    a None placeholder, so that any of them can be set from the command line.

    Call it last in `get_config`: fields with a value keep it.
    """
    for prefix in DURATIONS:
        for unit in UNITS:
            key = f"{prefix}_{unit}"
            if config.get(key) is None:
                config[key] = nullable(float if unit == "epochs" else int)
    return config
