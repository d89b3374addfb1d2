"""Prints the parameter tree of a pretrained checkpoint: shapes, dtypes and counts.

    python tools/inspect_params.py SPEC [--depth=N]
    python tools/inspect_params.py --config=CONFIG[:ARGS] [--step=N] [--num_classes=N] [--memory]
                                   [--config.KEY=VALUE ...]

SPEC is any `tljax.load_pretrained` spec (hf:DIR, timm:[ARCH:]FILE, big_vision:FILE.npz,
vit_jax:FILE.npz, torchvision:ARCH:FILE, efficientnet_lite0, minilm, tljax:DIR, ...).

With --config, prints the freeze schedule of a training config at step N (default 0):
per parameter its block group, whether it trains in the phase of step N and its lr
multiplier; the totals of trainable and all parameters; for LoRA the adapter count. The
dataset is not needed: without it the class count comes from --num_classes (or an
onehot(N) in input.pp) and a synthetic input goes through input.pp.
--memory adds what the first phase's train step holds for one batch of the config
(tljax.memory: parameters as stored, optimizer state, activations from the compiled step's
memory analysis, FLOPs); it compiles the step, which takes a while for a large model.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tljax import tree  # noqa: E402


def _count(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape)) if shape else 1


def _natural_key(name: str) -> list[Any]:
    """'block10/x' after 'block9/x': digit runs compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def describe(variables: Mapping[str, Any], max_depth: int | None = None) -> str:
    """A tree of `variables`: one line per leaf (shape, dtype, count) under per-subtree totals.

    `max_depth` folds everything below that depth into its subtree's line. Works on
    arrays and on `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`).
    """
    flat = tree.flatten(dict(variables))
    totals: dict[str, int] = {}
    for name, leaf in flat.items():
        parts = name.split("/")
        for depth in range(1, len(parts)):
            prefix = "/".join(parts[:depth])
            totals[prefix] = totals.get(prefix, 0) + _count(tuple(np.shape(leaf)))
    lines, seen = [], set()
    for name in sorted(flat, key=_natural_key):
        parts = name.split("/")
        for depth in range(1, len(parts)):
            prefix = "/".join(parts[:depth])
            if prefix not in seen and (max_depth is None or depth <= max_depth):
                seen.add(prefix)
                lines.append(f"{'  ' * (depth - 1)}{parts[depth - 1]}/  "
                             f"[{totals[prefix]:,}]")
        if max_depth is None or len(parts) <= max_depth:
            leaf = flat[name]
            shape = tuple(np.shape(leaf))
            lines.append(f"{'  ' * (len(parts) - 1)}{parts[-1]}  {shape}  "
                         f"{np.dtype(leaf.dtype).name}  {_count(shape):,}")
    by_collection = {c: t for c, t in totals.items() if "/" not in c}
    summary = ", ".join(f"{c}: {t:,}" for c, t in sorted(by_collection.items()))
    lines.append(f"total: {sum(by_collection.values()):,} ({summary})")
    return "\n".join(lines)


def _classes_in_pp(pp: str) -> int | None:
    """The class count a pp string spells out (onehot(N) / multihot(N)), if any."""
    match = re.search(r"\b(?:onehot|multihot)\(\s*(\d+)", pp)
    return int(match.group(1)) if match else None


def _task_and_sample(config: Any, num_classes: int | None, image_size: int
                     ) -> tuple[Any, dict, int | None, str]:
    """(task, one preprocessed example batch, train size or None, a note on where they came
    from): from the dataset when it can be read, else from the config and the flags."""
    from tljax import data, tasks
    from tljax.errors import InputError

    try:
        source, info = data.get_source(config.input.dataset, config.input.split,
                                       config.input.get("data_dir"))
        batches = data.train_batches(dataset=config.input.dataset, split=config.input.split,
                                     pp=config.input.pp, batch_size=config.input.batch_size,
                                     seed=config.seed, data_dir=config.input.get("data_dir"))
        return tasks.build_task(config.get("task"), info), batches.batch_at(0), len(source), ""
    except InputError as e:
        unreadable = e
    count = num_classes or _classes_in_pp(config.input.pp)
    if count is None:
        raise InputError(f"{unreadable} (or, without the dataset, give the class count: "
                         "--num_classes=N)") from unreadable
    names = tuple(str(i) for i in range(count))
    task_name = (config.get("task") or {}).get("name", "classification")
    text = "tokenize" in config.input.pp
    if task_name == "token_classification":
        from tljax.data.text import token_classification_features

        features = token_classification_features(names)
        example = {"tokens": ["word"], "tags": np.zeros(1, np.int64)}
    else:
        kind = "text" if text else "image"
        features = {kind: data.Feature(kind), "label": data.Feature("class_label", names)}
        example = {kind: "text" if text else np.zeros((image_size, image_size, 3), np.uint8),
                   "label": 0}
    info = data.DatasetInfo(config.input.dataset, features, {})
    batch = data.Preprocess(config.input.pp)([example], np.random.default_rng(0))
    note = (f"(dataset not read: {count} classes, a synthetic "
            f"{'text' if text else f'{image_size}x{image_size} image'} through input.pp)")
    return tasks.build_task(config.get("task"), info), batch, None, note


def describe_schedule(config: Any, step: int = 0, num_classes: int | None = None,
                      image_size: int = 224, memory: bool = False) -> str:
    """The freeze schedule of `config` at `step`: one line per parameter, then totals.

    Builds only shapes (`jax.eval_shape`): no weights are loaded or computed. The dataset
    gives the class count and a sample input when it can be read; without it the class
    count comes from `num_classes` (or an onehot(N) in input.pp) and the sample is synthetic.
    """
    import jax

    from tljax import freeze, models, validate
    from tljax.models import lora

    validate.check_config(config)
    task, batch, train_size, note = _task_and_sample(config, num_classes, image_size)
    model = models.from_config(config, task)
    sample = models.inputs_of(model, {k: np.asarray(v)[:1] for k, v in batch.items()
                                      if np.asarray(v).dtype != object})
    rng = jax.random.PRNGKey(0)
    options = freeze.lora_options(config)
    params = jax.eval_shape(lambda r: model.init({"params": r, "dropout": r}, sample,
                                                 train=False), rng)["params"]
    plan = freeze.Plan(config, params, model.blocks(), steps_per_epoch=(
        train_size / config.input.batch_size if train_size else None))
    index = plan.index_at(step)
    groups = plan.groups(index)
    blocks = plan.blocks
    lines = [f"step {step}: phase {index} {plan.phases[index].name!r} "
             f"(phases start at {[p.start for p in plan.phases]}) {note}".rstrip(),
             f"{'parameter':<72} {'group':>5} {'train':>5} {'lr mult':>9} {'size':>11}"]
    total = trainable = 0
    for name, leaf in tree.flatten(params).items():
        size = _count(tuple(leaf.shape))
        group = groups[name]
        block = freeze.block_index(name, blocks)
        total += size
        trainable += size if group is not None else 0
        lines.append(f"{name:<72} {'-' if block is None else block:>5} "
                     f"{'yes' if group else 'no':>5} "
                     f"{group.lr_mult if group else 0.0:>9.4g} {size:>11,}")
    lines.append(f"trainable: {trainable:,} of {total:,} parameters "
                 f"({100 * trainable / max(total, 1):.2f}%)")
    if options:
        count, size = lora.count_adapters(params)
        lines.append(f"LoRA: {count} adapted kernels, {size:,} adapter parameters "
                     f"(rank {options['rank']}, alpha {options['alpha']})")
    if memory:
        from tljax import memory as step_memory

        batch = {k: v for k, v in batch.items() if np.asarray(v).dtype != object}
        result = step_memory.step_memory(config, model, task, batch)
        lines.append(f"train step of {config.input.batch_size} examples (phase 0"
                     f"{', uncached' if config.get('cache_features') else ''}): "
                     f"{step_memory.describe(result)}")
    return "\n".join(lines)


def _config_main(argv: list[str]) -> int:
    """--config=FILE[:ARGS] [--step=N] [--num_classes=N] [--config.KEY=VALUE ...]."""
    from tljax import config as config_lib
    from tljax.errors import InputError, exit_status

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="training config FILE[:ARGS]")
    parser.add_argument("--step", type=int, default=0, help="training step to inspect")
    parser.add_argument("--num_classes", type=int, help="class count when the dataset is "
                        "not available")
    parser.add_argument("--image_size", type=int, default=224, help="side of the synthetic "
                        "image fed through input.pp when the dataset is not available")
    parser.add_argument("--memory", action="store_true", help="also compile the train step "
                        "and report what it holds (parameters, optimizer state, activations)")
    parser.add_argument("--verbose", action="store_true", help="tracebacks for input errors")
    overrides = [a[len("--config."):].partition("=") for a in argv if a.startswith("--config.")]
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    try:
        config = config_lib.load(args.config)
        for key, _, value in overrides:
            config_lib.override(config, key, value)
        print(describe_schedule(config, args.step, args.num_classes, args.image_size,
                               args.memory))
    except InputError as e:
        return exit_status(e, args.verbose)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a.startswith("--config") for a in argv):
        return _config_main(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("spec", help="a load_pretrained spec, e.g. efficientnet_lite0")
    parser.add_argument("--depth", type=int, default=None, help="fold subtrees below this depth")
    parser.add_argument("--verbose", action="store_true", help="tracebacks for input errors")
    args = parser.parse_args(argv)
    from tljax.errors import InputError, exit_status
    from tljax.pretrained import load_pretrained

    try:
        _, variables, info = load_pretrained(args.spec)
    except InputError as e:
        return exit_status(e, args.verbose)
    print(f"{args.spec}: {info.model_name} {info.model_kwargs}")
    print(describe(variables, args.depth))
    return 0


if __name__ == "__main__":
    sys.exit(main())
