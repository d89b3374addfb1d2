"""Cached backbone features for linear probes (`config.cache_features=True`).

When only the head trains for the whole run and the training pipeline has no random
ops, the backbone's output for an example never changes, so it is computed once:
`model.apply(variables, x, train=False, head=False)` (what the task's head reads: pooled
features, or per-token states) over the training split (batched, sharded over the mesh
like evaluation), stored in WORKDIR/features/ with the task's targets and reused by later
and resumed runs. Training then applies only the head (`model.head`) to batches of
cached features, taken in exactly the order `data.train_batches` would give the inputs
(same shuffle, same epochs, same resume state), so the head follows the same trajectory
as the uncached probe up to float rounding.

The backbone runs in inference mode (train=False) for the cache: dropout is off and
batch norm uses its running statistics, which is what a frozen backbone should do.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from tljax import data, freeze, models
from tljax.config import ConfigError
from tljax.data import pipeline
from tljax.data.preprocess import Preprocess


def check_cacheable(config: ml_collections.ConfigDict, plan: freeze.Plan,
                    lora_options: dict | None) -> bool:
    """True, or a one-line ConfigError saying why features cannot be cached."""
    if lora_options:
        raise ConfigError("config.cache_features=True needs a frozen backbone; lora(...) "
                          "trains adapters inside it.")
    for index, phase in enumerate(plan.phases):
        outside = sorted(n for n in plan.trainable_names(index) if not n.startswith(
            models.HEAD[1:]))
        if outside:
            raise ConfigError(f"config.cache_features=True needs a frozen backbone, but phase "
                              f"{phase.name!r} trains {outside[0]} (and {len(outside) - 1} "
                              f"more); use freeze='linear_probe'.")
    if Preprocess(config.input.pp).is_random:
        raise ConfigError(f"config.cache_features=True needs a deterministic input pipeline; "
                          f"input.pp={config.input.pp!r} has random ops (augmentation).")
    return True


def head_forward(model: models.Model) -> Callable:
    """The train step's forward on cached features: outputs = head(batch['features']).

    The rest of `params` (the frozen backbone) is passed through untouched.
    """

    def forward(params: Any, model_state: dict, batch: dict, rng: jax.Array
                ) -> tuple[jnp.ndarray, dict]:
        outputs = model.head.apply({"params": params["head"]}, batch["features"], train=True,
                                   rngs={"dropout": rng})
        return outputs, model_state

    return forward


def fingerprint(config: ml_collections.ConfigDict) -> str:
    """What the cached features depend on: model, its initialisation, data and pp."""
    keys = {"model_name": config.model_name, "model": config.get("model"),
            "init": config.get("init"), "dataset": config.input.dataset,
            "split": config.input.split, "pp": config.input.pp,
            "compute_dtype": config.get("compute_dtype"), "seed": config.seed,
            "freeze": config.get("freeze"), "task": config.get("task")}
    text = json.dumps(ml_collections.ConfigDict(keys).to_dict(), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def compute_features(config: ml_collections.ConfigDict, model: Any, variables: dict,
                     global_batch: Callable[[dict], dict]) -> dict[str, np.ndarray]:
    """{'features': (N, ...), target key: (N, ...)} of every training example, in order.

    The targets are the batch's arrays that are not model inputs (labels, tags, ...).
    """

    @jax.jit
    def embed(variables: dict, batch: dict) -> jnp.ndarray:
        return model.apply(variables, models.inputs_of(model, batch), train=False, head=False)

    batches = data.eval_batches(
        dataset=config.input.dataset, split=config.input.split, pp=config.input.pp,
        batch_size=config.eval.batch_size, data_dir=config.input.get("data_dir"),
        process_index=jax.process_index(), process_count=jax.process_count())
    columns: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        batch = global_batch(batch)
        keep = {k: v for k, v in batch.items() if k not in model.inputs and k != "mask"}
        out, keep, mask = multihost_utils.process_allgather(
            (embed(variables, batch), keep, batch["mask"]), tiled=True)
        mask = np.asarray(mask, bool)
        for key, value in {"features": out, **keep}.items():
            columns.setdefault(key, []).append(np.asarray(value)[mask])
    return {k: np.concatenate(v) for k, v in columns.items()}


class CachedBatches(Iterator[dict]):
    """`data.train_batches`' order over cached features; same state as TrainBatches.

    Batch s holds stream positions [s B, (s+1) B) (this process's chunk), each mapped to
    an example by the pipeline's per-epoch permutation, so the data order, and a resumed
    run's position, match the uncached run exactly.
    """

    def __init__(self, columns: dict[str, np.ndarray], like: pipeline.TrainBatches):
        self._columns = columns
        self._like = like
        self.info = like.info
        self.bad_examples = like.bad_examples

    def __next__(self) -> dict[str, Any]:
        step = self._like.step
        indices = self._like.indices_at(step)
        self._like.set_state({**self._like.get_state(), "step": step + 1})
        return {k: v[indices] for k, v in self._columns.items()}

    def get_state(self) -> dict[str, Any]:
        return self._like.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._like.set_state(state)


def cached_batches(config: ml_collections.ConfigDict, model: Any, state: dict,
                   train_iter: pipeline.TrainBatches, workdir: str,
                   global_batch: Callable[[dict], dict]) -> CachedBatches:
    """Loads WORKDIR/features/<fingerprint>.npz, computing and saving it first if missing."""
    if isinstance(model.head_input, (tuple, list)):
        raise ConfigError(f"config.cache_features=True stores one array per example, but this "
                          f"task's head reads {tuple(model.head_input)}; train without it.")
    path = os.path.join(workdir, "features", f"{fingerprint(config)}.npz")
    if os.path.exists(path):
        with np.load(path, allow_pickle=False) as f:
            columns = {k: f[k] for k in f.files}
        print(f"Cached features: {path} {columns['features'].shape}.", flush=True)
    else:
        variables = {"params": state["params"], **state["model_state"]}
        columns = compute_features(config, model, variables, global_batch)
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            np.savez(path + ".tmp.npz", **columns)
            os.replace(path + ".tmp.npz", path)
        print(f"Computed features of {len(columns['features']):,} examples into {path}.",
              flush=True)
    return CachedBatches(columns, train_iter)
