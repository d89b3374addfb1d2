"""Checks that stop a run before any work: every value, every name, the first batches.

The trainer calls these in order, and writes nothing to the workdir until all have passed:

  check_config(config)        keys (closest valid key), the type and range of every value,
                              every name (model family and variant, dtype, optimizer, split
                              syntax, pp ops of train and eval, regexes, init source and path,
                              mesh and sharding rules), in one line each; no data is read;
  check_batch_sizes(config)   train and eval batch sizes against the devices and processes;
  variable_shapes(...)        the model built from its config, shapes only;
  check_plan(plan)            every freeze phase trains something;
  check_batches(...)          the first train batch and the first eval batch (the eval
                              pipeline is built and read) go through the model and the task,
                              shapes only, so an eval mistake fails now, not after training.

`describe` is the plan `--dry_run` prints: data, durations, batches per device, model size,
freeze phases, init and what happens to the workdir.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np
from flax.errors import FlaxError

from tljax import config as config_lib
from tljax import selection
from tljax.config import ConfigError, closest
from tljax.errors import InputError, MissingFileError

DTYPES = ("float32", "bfloat16")
DECAY_TYPES = ("cosine", "linear", "constant")
NONFINITE = ("stop", "skip")
BAD_EXAMPLE = ("error", "skip")
SHARDING = ("replicate", "fsdp")

# A check takes a value and returns what was expected of it, or None when the value is fine.
Check = Callable[[Any], str | None]


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, bool)


def integer(low: int | None = None) -> Check:
    def check(value: Any) -> str | None:
        if not _is_int(value) or (low is not None and value < low):
            return "an integer" + (f" >= {low}" if low is not None else "")
        return None
    return check


def number(low: float | None = None, *, above: float | None = None,
           high: float | None = None) -> Check:
    """A finite number in [low, high] (or > above)."""
    def check(value: Any) -> str | None:
        bounds = [f">= {low}" if low is not None else "", f"> {above}" if above is not None
                  else "", f"<= {high}" if high is not None else ""]
        what = "a finite number " + " and ".join(b for b in bounds if b)
        if not _is_number(value) or not math.isfinite(value):
            return what.strip()
        if ((low is not None and value < low) or (above is not None and value <= above)
                or (high is not None and value > high)):
            return what.strip()
        return None
    return check


def optional(check: Check) -> Check:
    def optional_check(value: Any) -> str | None:
        problem = None if value is None else check(value)
        return problem and f"None or {problem}"
    return optional_check


def choice(*names: str) -> Check:
    def check(value: Any) -> str | None:
        if value in names:
            return None
        return f"one of {', '.join(names)}{closest(str(value), names, 'value')}"
    return check


def sharding_rule(value: Any) -> str | None:
    """'replicate', 'fsdp', or a PartitionSpec: per dimension None, an axis or a list of axes."""
    def axis(entry: Any) -> bool:
        return entry is None or isinstance(entry, str) or (
            isinstance(entry, (list, tuple)) and all(isinstance(a, str) for a in entry))

    if value in SHARDING or (isinstance(value, (list, tuple)) and all(map(axis, value))):
        return None
    return (f"one of {', '.join(SHARDING)}{closest(str(value), SHARDING, 'value')} or a "
            "PartitionSpec as a list, one entry per dimension: None, a mesh axis name, or a "
            "list of them (e.g. ['fsdp', 'model'])")


def boolean(value: Any) -> str | None:
    return None if isinstance(value, (bool, np.bool_)) else "true or false"


def text(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else "a non-empty string"


def split(value: Any) -> str | None:
    """A split string: NAME or NAME[slice] (the slice is checked against sizes later)."""
    from tljax.data.sources import parse_split

    if not isinstance(value, str):
        return "a split name such as 'train' or 'train[:90%]'"
    try:
        _, spec = parse_split(value)
    except ValueError:
        return "a split name such as 'train', 'train[:90%]' or 'test[:1000]'"
    if spec is not None:
        parts = spec.split(":")
        number_re = r"\s*(-?\d+(\.\d+)?%|-?\d+)?\s*"
        if len(parts) != 2 or not all(re.fullmatch(number_re, p) for p in parts):
            return "a slice [start:stop] of integers or percentages, e.g. 'train[:90%]'"
    return None


def _regex_problem(pattern: Any) -> str | None:
    try:
        re.compile(pattern)
    except (re.error, TypeError) as e:
        return f"regexes that compile ({pattern!r}: {e})"
    return None


def regex_pairs(kind: Check | None) -> Check:
    """[(regex, value), ...] with each value passing `kind` (None: anything)."""
    def check(value: Any) -> str | None:
        if not isinstance(value, (list, tuple)):
            return "a list of (regex, value) pairs"
        for item in value:
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                return f"a list of (regex, value) pairs (got {item!r})"
            problem = _regex_problem(item[0]) or (kind(item[1]) if kind else None)
            if problem:
                return problem
        return None
    return check


def regexes(value: Any) -> str | None:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        return "a list of regexes"
    return next(filter(None, map(_regex_problem, value)), None)


def mesh(value: Any) -> str | None:
    what = "a list of (axis name, size) pairs with sizes >= 1 or one -1, e.g. [('data', -1)]"
    if not isinstance(value, (list, tuple)) or not value:
        return what
    names = []
    for item in value:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)
                and _is_int(item[1]) and (item[1] >= 1 or item[1] == -1)):
            return what
        names.append(item[0])
    if len(set(names)) != len(names) or [s for _, s in value].count(-1) > 1:
        return what + ", names distinct"
    return None


def pp(value: Any) -> str | None:
    """A pp string whose ops exist and whose arguments parse (ops are built, not run)."""
    from tljax.data.preprocess import Preprocess

    if not isinstance(value, str):
        return "a pp string such as 'decode|resize(224)|value_range(-1, 1)'"
    try:
        Preprocess(value)
    except InputError as e:
        return f"a valid pp string ({e})"
    return None


def _rules() -> dict[str, Check]:
    """Every checked key (dotted) and its check; absent keys take config_lib's defaults."""
    from tljax import models

    rules: dict[str, Check] = {
        "seed": integer(),
        "model_name": choice(*models.FAMILIES),
        "lr": number(0.0),
        "grad_clip_norm": optional(number(above=0.0)),
        "freeze": text,
        "llrd": optional(number(above=0.0, high=1.0)),
        "lr_mults": optional(regex_pairs(number(0.0))),
        "wd_mults": optional(regex_pairs(number(0.0))),
        "unfreeze_warmup_steps": optional(integer(0)),
        "cache_features": boolean,
        "compute_dtype": choice(*DTYPES),
        "mesh": mesh,
        "sharding_rules": regex_pairs(sharding_rule),
        "keep_checkpoints": integer(1),
        "on_nonfinite": choice(*NONFINITE),
        "input.dataset": text,
        "input.split": split,
        "input.pp": pp,
        "input.batch_size": integer(1),
        "input.data_dir": optional(text),
        "input.on_bad_example": choice(*BAD_EXAMPLE),
        "eval.split": split,
        "eval.pp": pp,
        "eval.batch_size": integer(1),
        "lr_schedule.decay_type": choice(*DECAY_TYPES),
        "lr_schedule.linear_end": number(0.0),
        "init.arch": optional(text),
        "init.step": optional(integer(0)),
        "init.dont_load": regexes,
        "ema_decay": optional(number(0.0, high=1.0)),
        "expected.value": optional(number()),
        "expected.tolerance": optional(number(0.0)),
    }
    for prefix in config_lib.DURATIONS:
        first = 0 if prefix == "warmup" else 1  # only a warmup may be empty
        rules[f"{prefix}_steps"] = optional(integer(first))
        rules[f"{prefix}_examples"] = optional(integer(first))
        rules[f"{prefix}_epochs"] = optional(number(0.0) if first == 0 else number(above=0.0))
    return rules


def _get(config: ml_collections.ConfigDict, key: str) -> tuple[bool, Any]:
    node: Any = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False, None
        node = node[part]
    return True, node


def _shown(value: Any) -> str:
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    return repr(value)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Unknown keys, then every value's type and range, then names: one line each.

    Fills the defaults of keys the config leaves out first (config.json records them).
    """
    from tljax import models

    config_lib.with_defaults(config)
    if config.get("model_name") not in models.FAMILIES:
        problem = choice(*models.FAMILIES)(config.get("model_name"))
        raise ConfigError(f"config.model_name={config.get('model_name')!r}: expected {problem}.")
    config_lib.validate(config, models.model_fields(config.model_name))
    for key, check in _rules().items():
        present, value = _get(config, key)
        if not present:
            continue
        problem = check(value)
        if problem:
            raise ConfigError(f"config.{key}={_shown(value)}: expected {problem}.")
    _check_optimizer(config)
    _check_extra_evals(config)
    selection.check(config)
    _check_task(config)
    _check_model(config)
    _check_init(config)


def _check_optimizer(config: ml_collections.ConfigDict) -> None:
    ranges = {"momentum": number(0.0, high=1.0), "b1": number(0.0, high=1.0),
              "b2": number(0.0, high=1.0), "eps": number(0.0),
              "weight_decay": number(0.0), "nesterov": boolean}
    for key, value in dict(config.optim).items():
        if key == "name":
            continue
        check = ranges.get(key, optional(lambda v: None if _is_number(v) or isinstance(
            v, bool) else "a number"))
        problem = check(value)
        if problem:
            raise ConfigError(f"config.optim.{key}={value!r}: expected {problem}.")


EXTRA_EVAL_KEYS = ("split", "pp", "dataset", "batch_size")


def _check_extra_evals(config: ml_collections.ConfigDict) -> None:
    """config.extra_evals: {name: dict(split[, pp, dataset, batch_size])}, the missing keys
    taken from the eval's; a name is a metric prefix."""
    extra = config.get("extra_evals") or {}
    if not hasattr(extra, "items"):
        raise ConfigError(f"config.extra_evals={_shown(extra)}: expected a dict "
                          "{name: dict(split=..., pp=...)}.")
    for name, spec in extra.items():
        where = f"config.extra_evals.{name}"
        if not re.fullmatch(r"[A-Za-z_][\w-]*", name) or name == "ema":
            raise ConfigError(f"{where}: a name is a metric prefix: letters, digits, '_' or "
                              "'-', not 'ema'.")
        if not hasattr(spec, "keys"):
            raise ConfigError(f"{where}={_shown(spec)}: expected dict(split=..., pp=...).")
        unknown = set(spec.keys()) - set(EXTRA_EVAL_KEYS)
        if unknown:
            raise ConfigError(f"{where} has unknown keys {sorted(unknown)}; valid: "
                              f"{', '.join(EXTRA_EVAL_KEYS)}.")
        for key, check in (("split", split), ("pp", pp), ("dataset", text),
                           ("batch_size", integer(1))):
            if key in spec or key == "split":
                problem = check(spec.get(key))
                if problem:
                    raise ConfigError(f"{where}.{key}={spec.get(key)!r}: expected {problem}.")


def _check_task(config: ml_collections.ConfigDict) -> None:
    """The task's name and option names (the task checks its options' values itself)."""
    from tljax import tasks

    options = dict(config.get("task") or {})
    name = options.pop("name", "classification")
    valid = tasks.task_options(name)  # an unknown name fails here
    for key in options:
        if key not in valid:
            raise ConfigError(f"Unknown config key 'task.{key}' for task {name!r}"
                              f"{closest(key, valid)}; valid: {', '.join(sorted(valid))}.")


def _is_hub_id(path: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", path)) and not path.startswith(".")


def _check_init(config: ml_collections.ConfigDict) -> None:
    from tljax.pretrained.api import SOURCES

    init = config.get("init") or {}
    source = init.get("source")
    if not source:
        return
    if source not in SOURCES:
        raise ConfigError(f"config.init.source={source!r}: expected one of "
                          f"{', '.join(SOURCES)}{closest(source, SOURCES, 'value')}.")
    path = str(init.get("path") or "")
    if not path:
        raise ConfigError(f"config.init.source={source!r} needs config.init.path (a file or "
                          "directory of weights).")
    local = os.path.expanduser(path.split(":")[-1] if source in ("timm", "torchvision")
                               else path)
    remote = path.startswith("gs://") or (source in ("hf", "timm") and _is_hub_id(local))
    if not remote and (os.path.isabs(local) or local.startswith(".") or os.sep in local) \
            and not os.path.exists(local):
        raise MissingFileError(f"config.init.path={path!r}: no such file or directory; give "
                               "the pretrained weights' path, or init.source=None to train "
                               "from scratch.")


def _check_model(config: ml_collections.ConfigDict) -> None:
    """The backbone can be built from config.model (unknown variants and bad types fail)."""
    from tljax import models

    kwargs = models.json_kwargs(dict(config.get("model") or {}))
    try:
        models.build_backbone(config.model_name, **kwargs)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"config.model={_shown(config.model)} for model_name="
                          f"{config.model_name!r}: {e}") from e


def check_batch_sizes(config: ml_collections.ConfigDict, num_devices: int,
                      num_processes: int) -> None:
    """Batches are split over every device: each global batch size must divide evenly."""
    for key in ("input.batch_size", "eval.batch_size"):
        size = _get(config, key)[1]
        if size % num_devices:
            low = size // num_devices * num_devices
            options = " or ".join(str(s) for s in (low, low + num_devices) if s > 0)
            raise ConfigError(f"config.{key}={size} does not split over {num_devices} devices "
                              f"({num_processes} process(es)): use a multiple of "
                              f"{num_devices}, e.g. {options}.")


def variable_shapes(init: Callable[[Any], Any], rng: Any, config: ml_collections.ConfigDict
                    ) -> Any:
    """`jax.eval_shape(init, rng)`: the model's variables as shapes, built from its config."""
    import jax

    try:
        return jax.eval_shape(init, rng)
    except InputError:
        raise
    except (ValueError, TypeError, KeyError, AssertionError, FlaxError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model_name={config.model_name!r} with config.model="
                          f"{_shown(config.get('model'))} cannot be built on the first batch: "
                          f"{first}") from e


def check_plan(plan: Any) -> None:
    """Every freeze phase must train at least one parameter (else the phase is wasted)."""
    for index, phase in enumerate(plan.phases):
        if not plan.trainable_names(index):
            raise ConfigError(f"Freeze phase {phase.name!r} (from step {phase.start}) trains no "
                              "parameter: its rules freeze everything; check config.freeze / "
                              "config.schedule against the parameter names "
                              "(python tools/inspect_params.py --config=...).")


def _device_part(batch: dict) -> dict:
    return {k: np.asarray(v) for k, v in batch.items() if np.asarray(v).dtype != object}


def first_eval_batch(config: ml_collections.ConfigDict, process_index: int,
                     process_count: int) -> tuple[dict, int]:
    """(first batch, number of examples) of the eval pipeline the run will use; building it
    checks the eval split and pp against the data. Each of `config.extra_evals` is read
    too, and must give the model the same inputs (keys, shapes past the batch axis)."""
    from tljax import data

    first = None
    for prefix, where in config_lib.eval_sets(config):
        batches = data.eval_batches(
            dataset=where["dataset"], split=where["split"], pp=where["pp"],
            batch_size=where["batch_size"], data_dir=config.input.get("data_dir"),
            process_index=process_index, process_count=process_count,
            on_bad_example=config.input.on_bad_example)
        batch = batches.batch_at(0)
        if first is None:
            first = batch, batches.num_examples
            continue
        shapes = {k: np.shape(v)[1:] for k, v in _device_part(batch).items()}
        expected = {k: np.shape(v)[1:] for k, v in _device_part(first[0]).items()}
        if shapes != expected:
            raise ConfigError(f"config.extra_evals.{prefix[:-1]} gives batches of {shapes} per "
                              f"example, the eval split {expected}: use the same model inputs "
                              "(resolution, max_len) in its pp.")
    return first


def check_batches(model: Any, task: Any, variables: Any, train_batch: dict,
                  eval_batch: dict) -> None:
    """The task's loss on the first train batch and its eval outputs on the first eval batch
    compute (shapes only): a missing target key or a mis-sized input fails here."""
    import jax

    from tljax import models

    def loss(v: Any, batch: dict) -> Any:
        return task.loss(model.apply(v, models.inputs_of(model, batch), train=False), batch)

    def eval_outputs(v: Any, batch: dict) -> Any:
        return task.eval_outputs(task.eval_forward(model, v, models.inputs_of(model, batch)),
                                 batch)

    for what, fn, batch in (("train", loss, train_batch), ("eval", eval_outputs, eval_batch)):
        arrays = _device_part(batch)
        try:
            jax.eval_shape(fn, variables, arrays)
        except InputError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, FlaxError) as e:
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(arrays.items()))
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"The first {what} batch ({shapes}) does not fit the model and "
                             f"task {task.name!r}: {first} (check config."
                             f"{'input' if what == 'train' else 'eval'}.pp).") from e


def describe(config: ml_collections.ConfigDict, *, mesh: Any, info: Any, train_size: int,
             total_steps: int, every: dict[str, int | None], plan: Any, param_shapes: Any,
             eval_size: int, run: Any) -> str:
    """The resolved plan of a run, as `--dry_run` prints it."""
    from tljax import tree

    sizes = {n: int(np.prod(x.shape)) for n, x in tree.flatten(param_shapes).items()}
    devices = int(np.prod(list(mesh.shape.values())))
    batch, eval_batch = config.input.batch_size, config.eval.batch_size
    lines = [
        f"data      {config.input.dataset} {config.input.split!r}: {train_size:,} examples; "
        f"eval {config.eval.split!r}: {eval_size:,} examples in "
        f"{math.ceil(eval_size / eval_batch)} batches of {eval_batch}",
        f"pp        train {config.input.pp!r}",
        f"          eval  {config.eval.pp!r}",
        f"steps     {total_steps:,} of {batch} ({total_steps * batch / train_size:.2f} epochs); "
        + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in every.items() if v),
        f"devices   mesh {dict(mesh.shape)}: {batch // devices} train / {eval_batch // devices} "
        f"eval examples per device",
        f"model     {config.model_name} {_shown(config.get('model'))}: "
        f"{sum(sizes.values()):,} parameters, compute {config.compute_dtype}",
    ]
    for index, phase in enumerate(plan.phases):
        trainable = sum(sizes[n] for n in plan.trainable_names(index))
        lines.append(f"phase     {phase.name!r} from step {phase.start}: {trainable:,} trainable "
                     f"parameters")
    init = config.get("init") or {}
    lines.append(f"init      {init.get('source')}:{init.get('path')}" if init.get("source")
                 else "init      from scratch")
    lines.append(f"optimizer {dict(config.optim)} lr {config.lr} "
                 f"{dict(config.lr_schedule)}, clip {config.get('grad_clip_norm')}, "
                 f"on_nonfinite={config.on_nonfinite!r}")
    lines.append(f"workdir   {run.describe()}")
    return "\n".join(lines)

