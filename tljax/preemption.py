"""Preemption: SIGTERM (how clusters and spot machines stop a job) and SIGINT (Ctrl-C).

`Watch` installs handlers that only note the signal. The trainer asks `requested()` after
every step; once it says yes, the trainer saves a checkpoint of that step and raises
`Preempted` (exit status 128 + the signal's number, as a shell reports a process killed
by it, so a scheduler requeues the job), and rerunning the same command resumes exactly.
An evaluation or a save in progress finishes first. With several processes `requested()`
all-gathers every process's flag at every step, so all of them stop after the same step
even when the signal reached only some. A second SIGINT interrupts at once
(KeyboardInterrupt), for a person who does not want to wait.
"""

from __future__ import annotations

import signal
import sys
import threading

import numpy as np

from tljax.errors import Preempted

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Watch:
    """Notes SIGTERM/SIGINT from construction until `close()`."""

    def __init__(self):
        self.signum = 0
        self._announced = False
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():  # handlers live there only
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        del frame
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def requested(self) -> bool:
        """Whether to stop after this step; the same answer on every process."""
        import jax

        signum = self.signum
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            signum = int(np.max(multihost_utils.process_allgather(np.int32(signum))))
            self.signum = self.signum or signum
        if signum and not self._announced:
            self._announced = True
            print(f"{signal.Signals(signum).name} received: saving a checkpoint after this "
                  "step, then stopping.", file=sys.stderr, flush=True)
        return bool(signum)

    def stopped(self, step: int, checkpoints_dir: str) -> Preempted:
        name = signal.Signals(self.signum).name
        return Preempted(f"Stopped by {name} after step {step}: checkpoint {step} is saved in "
                         f"{checkpoints_dir}; run the same command again to resume.",
                         self.signum)

    def close(self) -> None:
        for signum, handler in self._previous.items():
            # None: the handler was installed outside Python (e.g. by jax.distributed).
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = {}
