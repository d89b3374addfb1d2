"""How a run ends when it cannot go on: mistakes of input, and runs stopped on purpose.

A config key that does not exist, a dataset that is not prepared, a checkpoint that does
not fit the model, an offline hub id: none of these is a bug in tljax, and the person who
made them needs one line saying what is wrong and how to fix it, not a traceback.
Every such error derives from `InputError`; `tljax.main` and every tool catch it, print
`Error: <message>` and exit with status 2 (see `report`; `--verbose` shows the traceback).

A run that started and then stopped before its end raises a `RunStopped` with its own exit
status: a diverged loss (`NonFiniteError`, 3) or a preemption signal (`Preempted`, 128 +
the signal's number, as a shell reports a process killed by it, after saving a checkpoint).
"""

from __future__ import annotations

import signal
import sys

EXIT_INPUT = 2


class InputError(ValueError):
    """A mistake of input; the message says what is wrong and how to fix it."""


class MissingFileError(InputError, FileNotFoundError):
    """A file or folder the input names does not exist."""


class RunStopped(Exception):
    """A started run that stopped before its end; `exit_status` tells a scheduler why."""

    exit_status = 1


class NonFiniteError(RunStopped):
    """The loss or the gradients became NaN or infinite (`config.on_nonfinite='stop'`)."""

    exit_status = 3


class Preempted(RunStopped):
    """SIGTERM or SIGINT arrived; a checkpoint of the step it stopped at was saved."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.exit_status = 128 + int(signum)


def report(error: BaseException, stream=None) -> int:
    """Prints `Error: <message>` for an input error and returns the exit status 2."""
    print(f"Error: {error}", file=stream or sys.stderr, flush=True)
    return EXIT_INPUT


def exit_status(error: BaseException, verbose: bool = False, stream=None) -> int:
    """The one way every entry point ends on an input error or a stopped run.

    Prints one line (`Error: ...` for input errors and divergence, the preemption note as
    it is) and returns the exit status; with `verbose` an input error re-raises instead,
    so developers see its traceback.
    """
    if isinstance(error, InputError):
        if verbose:
            raise error
        return report(error, stream)
    if isinstance(error, Preempted):
        print(str(error), file=stream or sys.stderr, flush=True)
        return error.exit_status
    if isinstance(error, RunStopped):
        print(f"Error: {error}", file=stream or sys.stderr, flush=True)
        return error.exit_status
    raise error
