"""Config helpers: config files, command-line overrides, strict keys, durations in any unit.

Every key a config may hold is listed in `TOP_LEVEL` (and `SECTIONS` for the
nested ones) with what it means, so a typo stops the run before any work with
one line naming the key and the closest valid one, instead of being ignored.
`DEFAULTS` fills the keys a config file leaves out, so every key can be set from the
command line and config.json records the whole resolved config.

Command-line values (`--config.key=value`, `override`) take the type of the field they
replace: booleans are true/false (yes/no, 1/0), numbers must parse, list and tuple fields
take Python literals (`--config.mesh="[('data', 2), ('fsdp', -1)]"`), and `None` clears
a field. The value ranges of every key are checked by `tljax.validate`.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import os
from collections.abc import Iterable
from typing import Any

import ml_collections
from ml_collections import config_dict

from tljax.errors import InputError, MissingFileError


class ConfigError(InputError):
    """A config that cannot run; the message is one line saying what to change."""


TOP_LEVEL = {
    "seed": "integer seed: fixes initialisation, data order, augmentation and dropout",
    "model_name": "model family: vit, resnet, resnetv2, vgg, efficientnet_lite, bert, gpt2, "
                  "llama, t5, ...",
    "model": "keyword arguments of the model family (checked against its constructor)",
    "init": "pretrained initialisation: source, path, dont_load regexes, arch, step",
    "input": "training data: dataset, split, pp, batch_size, data_dir, workers (processes "
             "building batches; 0: threads)",
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
    "accum_steps": "split each batch into this many microbatches, gradients accumulated inside "
                   "the step (input.batch_size stays the batch of one update)",
    "frozen_dtype": "store parameters that no phase trains in this dtype, e.g. 'bfloat16' "
                    "(None: as initialised)",
    "eval_at_start": "evaluate before the first step too (results.json: initial_eval)",
    "mesh": "list of (axis name, size) for the device mesh, -1 takes the remaining devices",
    "sharding_rules": "list of (regex, 'replicate' | 'fsdp' | PartitionSpec tuple) deciding "
                      "parameter sharding (tljax.sharding; tensor_parallel(family) for Megatron)",
    "keep_checkpoints": "number of checkpoints kept in WORKDIR/checkpoints (at least 1)",
    "on_nonfinite": "a NaN or infinite loss or gradient: 'stop' the run (exit status 3, the "
                    "last finite checkpoint kept) or 'skip' that update",
    "ema_decay": "exponential moving average of the weights, evaluated beside them as 'ema/...' "
                 "(tljax.ema; None: off), e.g. 0.9 for a run of ~50 steps, 0.999 for thousands",
    "early_stopping": "best-checkpoint selection on the eval split: dict(metric, patience, mode, "
                      "min_delta) (tljax.selection; None: off)",
    "extra_evals": "{name: dict(split[, pp, dataset, batch_size])}: more eval sets, evaluated "
                   "with the eval split (missing keys from eval/input), metrics prefixed "
                   "'name/' (e.g. a corrupted test set)",
    "expected": "published number this recipe reproduces: metric (a key of the final eval "
                "metrics, compared in %), value, tolerance, source; for benchmarks of task "
                "groups (VTAB) group and published [mean of group means, mean of tasks]",
}

DURATIONS = ("total", "warmup", "log_every", "eval_every", "checkpoint_every")
UNITS = ("steps", "epochs", "examples")
for _prefix in DURATIONS:
    for _unit in UNITS:
        TOP_LEVEL[f"{_prefix}_{_unit}"] = f"{_prefix.replace('_', ' ')} duration in {_unit}"

SECTIONS = {
    "input": {"dataset", "data_dir", "split", "pp", "batch_size", "on_bad_example", "workers"},
    "eval": {"split", "pp", "batch_size"},
    "init": {"source", "path", "dont_load", "arch", "step"},
    "lr_schedule": {"decay_type", "linear_end"},
    "expected": {"metric", "value", "tolerance", "source", "group", "published"},
}

OPTIMIZERS = ("sgd", "adamw")


def nullable(kind: type) -> ml_collections.FieldReference:
    """A None default that `--config.key=value` can still override."""
    return ml_collections.config_dict.placeholder(kind)



def _defaults() -> dict[str, Any]:
    """Keys a config file may leave out, with what they mean when it does."""
    defaults: dict[str, Any] = {
        "seed": 0, "task": {"name": "classification"}, "lr_schedule": {
            "decay_type": "cosine", "linear_end": 0.0},
        "grad_clip_norm": nullable(float), "freeze": "full", "schedule": nullable(list),
        "llrd": nullable(float), "lr_mults": nullable(list), "wd_mults": nullable(list),
        "unfreeze_warmup_steps": nullable(int), "cache_features": False,
        "compute_dtype": "float32", "mesh": [("data", -1)],
        "sharding_rules": [(".*", "replicate")], "keep_checkpoints": 2,
        "on_nonfinite": "stop", "ema_decay": nullable(float),
        "early_stopping": nullable(dict), "extra_evals": {},
        "init": {"source": nullable(str), "path": "", "dont_load": [], "arch": nullable(str),
                 "step": nullable(int)},
        "input": {"data_dir": nullable(str), "on_bad_example": "error"},
    }
    for prefix in DURATIONS:
        for unit in UNITS:
            defaults[f"{prefix}_{unit}"] = nullable(float if unit == "epochs" else int)
    return defaults


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with every key of `_defaults` it lacks added (in place; also returned)."""
    with config.unlocked():
        for key, value in _defaults().items():
            if isinstance(value, dict):
                if config.get(key) is None:
                    config[key] = value
                else:
                    for sub, sub_value in value.items():
                        if sub not in config[key]:
                            config[key][sub] = sub_value
            elif key not in config:
                config[key] = value
    return config


# ---------------------------------------------------------------------------
# Config files and command-line overrides.


def load(spec: str) -> ml_collections.ConfigDict:
    """`FILE[:ARGS]` -> `FILE`'s get_config(ARGS), with defaults filled in.

    Mistakes in the arguments (an unknown name, a value of the wrong type, a value the
    file rejects) are ConfigErrors naming the file.
    """
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        others = sorted(f for f in os.listdir(folder) if f.endswith(".py")) if os.path.isdir(
            folder) else []
        hint = closest(os.path.basename(path), others, "file")
        raise MissingFileError(f"Config file {path!r} not found{hint}.")
    module_spec = importlib.util.spec_from_file_location("_tljax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except InputError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        what = f"{type(e).__name__} {e}" if isinstance(e, KeyError) else str(e)
        raise ConfigError(f"{path}: get_config({arg!r}) failed: {what}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict, "
                          f"not {type(config).__name__}.")
    return with_defaults(config)


def _field_type(node: ml_collections.ConfigDict, key: str) -> type | None:
    """The type a field holds (a placeholder's declared type), None when it is untyped."""
    field = node._fields.get(key)  # noqa: SLF001 - placeholders keep their type here
    if isinstance(field, config_dict.FieldReference):
        return field.get_type()
    return None if field is None else type(field)


def parse_value(name: str, text: str, kind: type | None) -> Any:
    """The command-line string `text` for field `name` of type `kind` (None: untyped)."""
    if text.strip() == "None":
        return None
    expected = {bool: "true or false", int: "an integer", float: "a number",
                list: "a list literal, e.g. [('data', -1)]",
                tuple: "a tuple literal, e.g. (16, 16)"}
    try:
        if kind is bool:
            value = {"true": True, "yes": True, "1": True, "false": False, "no": False,
                     "0": False}[text.strip().lower()]
        elif kind is int:
            value = int(text)
        elif kind is float:
            value = float(text)
        elif kind in (list, tuple):
            value = ast.literal_eval(text)
            if not isinstance(value, (list, tuple)):
                raise ValueError(text)
            value = kind(value)
        elif kind is None:  # untyped (None default): a literal when it is one, else text
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
        elif kind is str:
            value = text
        else:
            raise ConfigError(f"--config.{name} holds a {kind.__name__}; set its keys one by "
                              f"one (--config.{name}.KEY=VALUE).")
    except (KeyError, ValueError, SyntaxError):
        raise ConfigError(f"--config.{name}={text!r}: expected {expected[kind]}.") from None
    return value


def override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Sets `config.<key>` from the command-line string `text` (see the module docstring)."""
    *parents, last = key.split(".")
    node, walked = config, []
    for part in [*parents, last]:
        valid = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        if part not in valid:
            where = ".".join(walked) or "config"
            raise ConfigError(f"Unknown config key {key!r}: {where} has no {part!r}"
                              f"{closest(part, valid)}.")
        if part != last:
            node, walked = node[part], walked + [part]
    value = parse_value(key, text, _field_type(node, last))
    try:
        node[last] = value
    except TypeError as e:
        raise ConfigError(f"--config.{key}={text!r}: {e}.") from None


def closest(key: str, valid: Iterable[str], what: str = "key") -> str:
    """' (closest valid key: X)' (or value, file, ...) or '' when nothing is close."""
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (closest valid {what}: {match[0]})" if match else ""


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
        elif default is None:
            result[name] = value
        else:
            try:
                result[name] = parse_value(name, value, type(default))
            except ConfigError:
                kind = {bool: "true or false", int: "an integer", float: "a number"}.get(
                    type(default), type(default).__name__)
                raise ConfigError(f"Config argument {name}={value!r}: expected {kind}."
                                  ) from None
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
    accum = config.get("accum_steps")
    if accum is not None:
        batch_size = (config.get("input") or {}).get("batch_size")
        if not isinstance(accum, int) or accum < 1:
            raise ConfigError(f"config.accum_steps={accum!r}: expected a positive integer.")
        if batch_size and batch_size % accum:
            raise ConfigError(f"input.batch_size={batch_size} is not divisible by "
                              f"accum_steps={accum}: each microbatch needs the same size.")
    for prefix in DURATIONS:
        given = [f"{prefix}_{u}" for u in UNITS if config.get(f"{prefix}_{u}") is not None]
        if len(given) > 1:
            raise ConfigError(f"Conflicting durations {' and '.join(given)}: set only one "
                              f"(the others to None).")
        if prefix == "total" and not given:
            raise ConfigError("No training duration: set one of total_steps, total_epochs, "
                              "total_examples.")


def eval_sets(config: ml_collections.ConfigDict) -> list[tuple[str, dict[str, Any]]]:
    """(metric prefix, dataset/split/pp/batch_size) of every evaluation: the eval split ('')
    then each of `config.extra_evals` ('NAME/'), whose missing keys come from the eval's."""
    main = {"dataset": config.input.dataset, "split": config.eval.split, "pp": config.eval.pp,
            "batch_size": config.eval.batch_size}
    return [("", main)] + [(f"{name}/", {**main, **dict(extra)})
                           for name, extra in (config.get("extra_evals") or {}).items()]


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
