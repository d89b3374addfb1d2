"""The workdir of a run: checked before any work, locked while a run writes to it.

`RunDir(path)` only reads. It refuses, in one line each: a path that is a file, a folder this
user cannot write, and a workdir another run holds (naming that run's host and pid). It
reads what an earlier run left there: config.json, finished checkpoints, results.json.

`check_resume(config)`: a workdir holding checkpoints or results continues only with the
config that made them. The keys in `RESUME_KEYS` decide the parameter tree, the optimizer
state's structure and the order of the data, so a changed one is refused, naming every
changed key with both values; other keys (total steps, lr, eval, logging...) may change.

`claim()` creates the folder and takes the lock (process 0 holds it; every process learns
the outcome, so a refused multi-process run stops everywhere). `write_config` replaces
config.json atomically, and the trainer calls it only once the run has resumed (or found
nothing to resume): a run that fails its checks or its resume leaves a finished run's
config.json, results.json and metrics.jsonl as they were.

The lock is WORKDIR/.lock, an `flock` held for the run's life and holding the holder's host,
pid and start time. The kernel drops it when its process dies, however it dies, so the lock
of a dead run is taken over without asking. It works across hosts on file systems with
POSIX locks (NFSv4, Lustre, GPFS). Every process of a multi-process run probes the lock as it
starts: a probe takes it shared for an instant, so probes never refuse each other, and
`claim` waits out a probe that holds it at that instant (`PROBE_WAIT_S`) before calling the
workdir held. Once the processes have met, only process 0 looks at the lock: it may already
hold it when a slower peer gets there.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Any

import ml_collections

from tljax.errors import InputError

LOCK = ".lock"
# A probe holds the lock for microseconds, a run for its life: longer than any probe.
PROBE_WAIT_S = 2.0
# What a checkpoint's contents and the data order depend on (see the module docstring).
RESUME_KEYS = ("model_name", "model", "task", "freeze", "schedule", "llrd", "lr_mults",
               "wd_mults", "optim", "grad_clip_norm", "cache_features", "ema_decay", "seed",
               "input.dataset", "input.split", "input.pp", "input.batch_size")


def write_json(path: str, value: Any) -> None:
    """Writes JSON to `path` atomically: a reader (or a kill) never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(value if isinstance(value, str) else json.dumps(value, indent=2))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flat(sub, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: value}


def _as_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def _holder(path: str) -> str:
    info = _read_json(path) or {}
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} (since "
            f"{info.get('started', '?')})")


def _try_lock(fd: int, mode: int = fcntl.LOCK_EX) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class RunDir:
    """A run's workdir; see the module docstring."""

    def __init__(self, path: str, probe_lock: bool = True):
        self.path = os.path.abspath(os.path.expanduser(path))
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise InputError(f"--workdir={path} is a file, not a folder: give a folder (it is "
                             "created when missing).")
        existing = self.path
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.access(existing, os.W_OK | os.X_OK):
            raise InputError(f"--workdir={path}: {existing} is not writable by this user; "
                             "choose a folder you can write to.")
        if probe_lock:
            self._check_not_held()
        self.saved_config = _read_json(os.path.join(self.path, "config.json"))
        self.results = _read_json(os.path.join(self.path, "results.json"))
        self.checkpoint_steps = sorted(
            int(name) for name in (os.listdir(os.path.join(self.path, "checkpoints"))
                                   if os.path.isdir(os.path.join(self.path, "checkpoints"))
                                   else []) if name.isdigit())
        self._lock_fd: int | None = None

    def _check_not_held(self) -> None:
        """Refuses at once when a live run holds the lock (the probe writes nothing)."""
        path = os.path.join(self.path, LOCK)
        if not os.path.exists(path):
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            if not _try_lock(fd, fcntl.LOCK_SH):
                raise InputError(f"--workdir={self.path} is in use by another run: "
                                 f"{_holder(path)}. Wait for it to end, or stop it; a second "
                                 "run on the same workdir would corrupt both.")
        finally:
            os.close(fd)  # also drops the probe's lock

    @property
    def resumable(self) -> bool:
        return bool(self.checkpoint_steps) or self.results is not None

    def check_resume(self, config: ml_collections.ConfigDict) -> None:
        """Refuses a config whose RESUME_KEYS differ from those of the run saved here."""
        if not self.resumable or self.saved_config is None:
            return
        saved, new = _flat(self.saved_config), _flat(_as_json(config))
        changed = []
        for key in sorted(set(saved) | set(new)):
            if any(key == k or key.startswith(k + ".") for k in RESUME_KEYS):
                if saved.get(key) != new.get(key):
                    changed.append(f"{key} {saved.get(key)!r} -> {new.get(key)!r}")
        if changed:
            more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
            raise InputError(
                f"Cannot resume {self.path} with this config: {'; '.join(changed[:5])}{more} "
                "(saved -> given). These decide the checkpoints' contents and the data order: "
                "use another --workdir, or the saved values (its config.json).")

    def describe(self) -> str:
        """What a run would do with this workdir, for --dry_run."""
        if self.results is not None:
            return (f"{self.path} holds a finished run (results.json, checkpoints "
                    f"{self.checkpoint_steps}): it continues only if total steps grew")
        if self.checkpoint_steps:
            return (f"{self.path}: resumes from the newest checkpoint that restores (steps "
                    f"{self.checkpoint_steps})")
        if os.path.isdir(self.path) and os.listdir(self.path):
            return f"{self.path} holds a run with no checkpoint: it starts again from step 0"
        return f"{self.path}: a new run"

    def claim(self, is_chief: bool = True, process_count: int = 1) -> None:
        """Creates the folder and takes the lock; every process raises if process 0 cannot."""
        error = None
        if is_chief:
            try:
                self._lock()
            except InputError as e:
                error = e
        if process_count > 1:
            import numpy as np
            from jax.experimental import multihost_utils

            ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
            if not ok and error is None:
                raise InputError(f"Process 0 could not claim --workdir={self.path}; its log "
                                 "says why.")
        if error is not None:
            raise error

    def _lock(self) -> None:
        path = os.path.join(self.path, LOCK)
        try:
            os.makedirs(self.path, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise InputError(f"Cannot create --workdir={self.path}: {e.strerror}.") from None
        deadline = time.monotonic() + PROBE_WAIT_S
        while not _try_lock(fd):
            if time.monotonic() > deadline:
                os.close(fd)
                raise InputError(f"--workdir={self.path} is in use by another run: "
                                 f"{_holder(path)}. Wait for it to end, or stop it.")
            time.sleep(0.05)
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._lock_fd = fd

    def write_config(self, config: ml_collections.ConfigDict, is_chief: bool = True) -> None:
        if is_chief:
            write_json(os.path.join(self.path, "config.json"), config.to_json_best_effort(
                indent=2))

    def release(self) -> None:
        """Drops the lock (the file stays: deleting it would race with a new run's lock)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
