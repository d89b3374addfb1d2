"""Orbax checkpoints of a training run, and of bare variables (converted weights).

A run's checkpoint at step s, in WORKDIR/checkpoints/<s>/, holds two items:
`state` (params, model_state, opt_state, rng; restored onto any mesh through
the shardings of an abstract state) and `data` (the input iterator's position,
JSON), so a resumed run sees exactly the batches the uninterrupted run would.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class RunCheckpoints:
    """Periodic and final saves of a run, keeping the newest `keep`."""

    def __init__(self, workdir: str, keep: int = 2):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict) -> None:
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """State placed with the shardings of `abstract_state` (ShapeDtypeStructs)."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored.state, restored.data

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def save_variables(directory: str, variables: Any, metadata: dict | None = None) -> None:
    """Writes model variables (e.g. converted pretrained weights) as a tljax checkpoint.

    Layout: DIRECTORY/variables (Orbax) and DIRECTORY/metadata.json.
    """
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    variables = jax.tree_util.tree_map(np.asarray, variables)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, "variables"), variables, force=True)
    with open(os.path.join(directory, "metadata.json"), "w") as f:
        json.dump(metadata or {}, f, indent=2, default=str)


def load_variables(directory: str, step: int | None = None) -> tuple[dict, dict]:
    """(variables as numpy, metadata) from `save_variables` output or a run's workdir.

    For a workdir (or its checkpoints/ folder) this reads `params` and
    `model_state` of checkpoint `step` (default: the latest).
    """
    directory = os.path.abspath(directory)
    if os.path.isdir(os.path.join(directory, "variables")):
        with ocp.StandardCheckpointer() as checkpointer:
            variables = checkpointer.restore(os.path.join(directory, "variables"))
        with open(os.path.join(directory, "metadata.json")) as f:
            return jax.tree_util.tree_map(np.asarray, variables), json.load(f)
    root = directory if os.path.basename(directory) == "checkpoints" else os.path.join(
        directory, "checkpoints")
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"No tljax checkpoint in {directory}: expected {directory}/variables (written by "
            f"tools/convert_checkpoint.py) or {root}/<step>/ (written by a training run).")
    manager = ocp.CheckpointManager(
        root, options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{root} holds no finished checkpoint.")
    # Restored as plain numpy on the host: no mesh, no abstract tree needed. Without
    # restore_args Orbax would rebuild the saved shardings, which name the saving run's
    # devices (all processes, all meshes) and fail anywhere else.
    leaves = manager.item_metadata(step)["state"].tree
    as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), leaves)
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(restore_args=as_numpy)))
    state = jax.tree_util.tree_map(np.asarray, state.state)
    metadata = {"step": step}
    for key in ("config", "results"):
        path = os.path.join(os.path.dirname(root), f"{key}.json")
        if os.path.exists(path):
            with open(path) as f:
                metadata[key] = json.load(f)
    return {"params": state["params"], **state.get("model_state", {})}, metadata
