"""The one exception type for mistakes of input.

A config key that does not exist, a dataset that is not prepared, a checkpoint that does
not fit the model, an offline hub id: none of these is a bug in tljax, and the person who
made them needs one line saying what is wrong and how to fix it, not a traceback.
Every such error derives from `InputError`; `tljax.main` and every tool catch it, print
`Error: <message>` and exit with status 2 (see `report`).
"""

from __future__ import annotations

import sys


class InputError(ValueError):
    """A mistake of input; the message says what is wrong and how to fix it."""


def report(error: BaseException, stream=None) -> int:
    """Prints `Error: <message>` for an input error and returns the exit status 2."""
    print(f"Error: {error}", file=stream or sys.stderr, flush=True)
    return 2
