"""Orbax checkpoints of a training run, and of bare variables (converted weights).

A run's checkpoint at step s, in WORKDIR/checkpoints/<s>/, holds two items:
`state` (params, model_state, opt_state, rng; restored onto any mesh through
the shardings of an abstract state) and `data` (the input iterator's position,
JSON), so a resumed run sees exactly the batches the uninterrupted run would.

Orbax writes a checkpoint into a temporary folder and renames it when complete, so a
process killed during a save leaves no half checkpoint under a step's name (the temporary
folder is removed when the next run opens the folder). A checkpoint that is there but
cannot be read (a truncated or deleted file) is reported in one line and the newest one
that restores is used instead, by runs (`RunCheckpoints.restore_latest`, which moves the
unreadable ones to WORKDIR/checkpoints_unreadable/) and by tools (`load_variables`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from tljax.errors import InputError, MissingFileError

UNREADABLE = "checkpoints_unreadable"


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__


_ABANDONED_READ_REPORTS = ("exception was never retrieved", "Task was destroyed but it is pending")


class _AbandonedReadFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(report in str(record.msg) for report in _ABANDONED_READ_REPORTS)


def _raised_in_checkpoint_io(traceback: Any) -> bool:
    """Whether a traceback passes through Orbax or asyncio (an abandoned read's, not user
    code's)."""
    while traceback is not None:
        filename = traceback.tb_frame.f_code.co_filename.replace(os.sep, "/")
        if "/orbax/" in filename or "/asyncio/" in filename:
            return True
        traceback = traceback.tb_next
    return False


def _quiet_abandoned_reads() -> None:
    """After a failed restore, Orbax's other reads of that checkpoint are abandoned. They end
    later, when the event loop is closed or their tasks are collected, as 'Event loop is
    closed' reports, other unraisable errors raised in Orbax or asyncio, or asyncio's 'Task
    exception was never retrieved' log lines, each with a traceback: ninety-odd of them after
    the one line that matters. Those reports, and only those, are dropped; whether and when
    they appear depends on timing, and the first can come while the failing restore is still
    unwinding, so this is installed before checkpoints are read, not after a failure."""
    previous = sys.unraisablehook
    if getattr(previous, "tljax_quiet", False):
        return

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        if not (closed_loop or _raised_in_checkpoint_io(unraisable.exc_traceback)):
            previous(unraisable)

    hook.tljax_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_AbandonedReadFilter())


class RunCheckpoints:
    """Periodic and final saves of a run, keeping the newest `keep`."""

    def __init__(self, workdir: str, keep: int = 2):
        self._workdir = os.path.abspath(workdir)
        self._directory = os.path.join(self._workdir, "checkpoints")
        self._keep = keep
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True,
                                               cleanup_tmp_directories=True)
        return ocp.CheckpointManager(self._directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore_latest(self, abstract_at: Callable[[int], Any]
                       ) -> tuple[int, Any, dict] | None:
        """(step, state, data state) of the newest checkpoint that restores; None if there is
        none. `abstract_at(step)` is the abstract state of a checkpoint of that step (its
        freeze phase decides the optimizer state). Unreadable newer checkpoints are named in
        one line each and moved aside."""
        failed: list[tuple[int, BaseException]] = []
        _quiet_abandoned_reads()
        for step in sorted(self._manager.all_steps(), reverse=True):
            abstract = abstract_at(step)
            try:
                state, data_state = self.restore(step, abstract)
            except Exception as e:  # noqa: BLE001 - whatever the cause, it cannot be used
                failed.append((step, e))
                print(f"Checkpoint {step} in {self._directory} cannot be restored "
                      f"({_reason(e)}); trying the one before.", file=sys.stderr, flush=True)
                continue
            if failed:
                self._set_aside([s for s, _ in failed])
            return step, state, data_state
        if failed:
            step, error = failed[0]
            raise InputError(
                f"No checkpoint in {self._directory} restores (steps "
                f"{', '.join(str(s) for s, _ in failed)}; newest: {_reason(error)}). Restore "
                "them from a backup, or move the folder away to start the run again.") from error
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Moves unreadable checkpoints out of the way of new saves (kept for inspection)."""
        from jax.experimental import multihost_utils

        if jax.process_index() == 0:
            aside = os.path.join(self._workdir, UNREADABLE)
            os.makedirs(aside, exist_ok=True)
            for step in steps:
                shutil.move(os.path.join(self._directory, str(step)),
                            os.path.join(aside, f"{step}"))
                print(f"Moved unreadable checkpoint {step} to {aside}/{step}.", file=sys.stderr,
                      flush=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("tljax: unreadable checkpoints set aside")
        self._manager.close()
        self._manager = self._open()

    def save(self, step: int, state: Any, data_state: dict) -> None:
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """State placed with the shardings of `abstract_state` (ShapeDtypeStructs)."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored.state, restored.data

    def close(self) -> None:
        """Waits for a save in flight to finish, then releases the manager (once)."""
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()
            self._manager = None


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
        raise MissingFileError(
            f"No tljax checkpoint in {directory}: expected {directory}/variables (written by "
            f"tools/convert_checkpoint.py) or {root}/<step>/ (written by a training run).")
    manager = ocp.CheckpointManager(
        root, options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})
    try:
        steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
        if not steps:
            raise MissingFileError(f"{root} holds no finished checkpoint.")
        failed: list[tuple[int, BaseException]] = []
        _quiet_abandoned_reads()
        for candidate in steps:
            try:
                state = _restore_as_numpy(manager, candidate)
            except Exception as e:  # noqa: BLE001 - whatever the cause, it cannot be used
                failed.append((candidate, e))
                print(f"Checkpoint {candidate} in {root} cannot be restored ({_reason(e)})"
                      f"{'; trying the one before' if len(steps) > 1 else ''}.",
                      file=sys.stderr, flush=True)
                continue
            step = candidate
            break
        else:
            raise InputError(f"No checkpoint in {root} restores (steps "
                             f"{', '.join(str(s) for s, _ in failed)}; newest: "
                             f"{_reason(failed[0][1])}).") from failed[0][1]
    finally:
        manager.close()
    metadata = {"step": step}
    for key in ("config", "results"):
        path = os.path.join(os.path.dirname(root), f"{key}.json")
        if os.path.exists(path):
            with open(path) as f:
                metadata[key] = json.load(f)
    return {"params": state["params"], **state.get("model_state", {})}, metadata


def _restore_as_numpy(manager: ocp.CheckpointManager, step: int) -> dict:
    """The `state` item of checkpoint `step` as plain numpy on the host: no mesh, no
    abstract tree needed. Without restore_args Orbax would rebuild the saved shardings,
    which name the saving run's devices (all processes, all meshes) and fail anywhere else."""
    metadata = manager.item_metadata(step)["state"]
    if metadata is None:
        raise MissingFileError(f"checkpoint {step} has no readable state metadata")
    as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                      metadata.tree)
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(restore_args=as_numpy)))
    return jax.tree_util.tree_map(np.asarray, state.state)
