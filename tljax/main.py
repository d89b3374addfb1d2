"""Entry point: `python -m tljax.main --config=configs/vit_finetune.py[:args] --workdir=DIR`.

`--config.key=value` overrides any config field. Config mistakes stop the run
before any work with one line saying what to change.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tljax.config import ConfigError, closest
from tljax.errors import InputError, report

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with arguments: FILE:arg=value,...",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-host runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def _fail(message: str) -> None:
    sys.exit(report(InputError(message)))


def _load_config_file(spec: str):
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        _fail(f"config file {path!r} not found.")
    module_spec = importlib.util.spec_from_file_location("_tljax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _check_overrides(argv: list[str]) -> None:
    """Names an unknown `--config.a.b=...` key with its closest valid key, in one line."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        return
    try:
        config = _load_config_file(spec)
    except ConfigError as e:
        _fail(str(e))
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].split("=", 1)[0]
        node, walked = config, []
        for part in key.split("."):
            valid = list(node.keys()) if hasattr(node, "keys") else []
            if part not in valid:
                where = ".".join(walked) or "config"
                _fail(f"unknown config key {key!r}: {where} has no {part!r}"
                      f"{closest(part, valid)}.")
            node, walked = node[part], walked + [part]


# `--config.key=None` clears a field, e.g. the unit a config file set for a duration;
# ml_collections cannot parse None into a typed field, so these are applied after parsing.
_CLEARED: list[str] = []


def _parse_flags(argv: list[str]) -> list[str]:
    _check_overrides(argv)
    _CLEARED.extend(a[len("--config."):-len("=None")] for a in argv
                    if a.startswith("--config.") and a.endswith("=None"))
    argv = [a for a in argv if not (a.startswith("--config.") and a.endswith("=None"))]
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        _fail(str(e).splitlines()[0])


def main(argv: list[str]) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # library INFO chatter would bury the progress
    if _CONFIG.value is None or _WORKDIR.value is None:
        _fail("both --config=FILE and --workdir=DIR are required.")
    config = _CONFIG.value
    for key in _CLEARED:
        *parents, last = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[last] = None
    if _COORDINATOR.value:
        import jax

        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from tljax import train  # after distributed init: nothing may touch JAX before it

    try:
        train.train_and_evaluate(config, _WORKDIR.value)
    except InputError as e:
        # Mistakes of input, not of code: the message says what to change; no traceback.
        _fail(str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
