"""Entry point: `python -m tljax.main --config=configs/vit_finetune.py[:args] --workdir=DIR`.

`--config.key=value` overrides any config field (typed like the field; lists and tuples as
Python literals, e.g. `--config.mesh="[('data', 2), ('fsdp', -1)]"`; `None` clears it).
Every mistake of input stops the run before any work with one line saying what to change
(exit status 2); `--verbose` shows its traceback too, for developers. `--dry_run` runs every
check, prints the run's plan and exits without writing anything. A run that diverges exits
with status 3, one stopped by SIGTERM/SIGINT with 128 + the signal after saving a checkpoint.

Several hosts: `--coordinator_address=HOST0:PORT --num_processes=N --process_id=I` on every
host; a process that cannot join within `--distributed_timeout` seconds says so in one line.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Sequence

from tljax import config as config_lib
from tljax.errors import InputError, RunStopped, exit_status
from tljax.workdir import RunDir

FLAGS = ("config", "workdir", "coordinator_address", "num_processes", "process_id",
         "distributed_timeout", "dry_run", "verbose")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would exit with its usage text
        raise InputError(f"{message} (see python -m tljax.main --help).")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m tljax.main", description=__doc__.split("\n")[0],
                     allow_abbrev=False)
    parser.add_argument("--config", help="config file, optionally with arguments: "
                        "FILE:arg=value,...; then --config.KEY=VALUE overrides")
    parser.add_argument("--workdir", help="where checkpoints, metrics and results go")
    parser.add_argument("--coordinator_address", help="HOST:PORT of process 0 (several hosts)")
    parser.add_argument("--num_processes", type=int, help="processes of a multi-host run")
    parser.add_argument("--process_id", type=int, help="this process's index")
    parser.add_argument("--distributed_timeout", type=int, default=300,
                        help="seconds to wait for all processes to join")
    parser.add_argument("--dry_run", action="store_true",
                        help="check everything, print the plan, write nothing")
    parser.add_argument("--verbose", action="store_true", help="tracebacks for input errors")
    return parser


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
    """(flags, [(config key, value text)]) from the command line."""
    overrides, rest = [], []
    for arg in argv:
        if arg.startswith("--config."):
            key, has_value, value = arg[len("--config."):].partition("=")
            if not has_value:
                raise InputError(f"{arg}: give a value, as --config.{key}=VALUE.")
            overrides.append((key, value))
        else:
            name = arg[2:].partition("=")[0] if arg.startswith("--") else None
            if name is not None and name not in FLAGS and name != "help":
                raise InputError(f"Unknown flag --{name}{config_lib.closest(name, FLAGS, 'flag')}; "
                                 f"flags: {', '.join('--' + f for f in FLAGS)}, --config.KEY.")
            rest.append(arg)
    args = _parser().parse_args(rest)
    if args.config is None or args.workdir is None:
        raise InputError("Both --config=FILE and --workdir=DIR are required.")
    if overrides and args.config is None:
        raise InputError("--config.KEY=VALUE overrides need --config=FILE.")
    return args, overrides


def _check_distributed(args: argparse.Namespace) -> None:
    given = [f"--{n}" for n in ("num_processes", "process_id") if getattr(args, n) is not None]
    if not args.coordinator_address:
        if given:
            raise InputError(f"{' and '.join(given)} need --coordinator_address=HOST0:PORT "
                             "(process 0's host and a free port on it), on every process.")
        return
    host, _, port = args.coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--coordinator_address={args.coordinator_address!r}: expected "
                         "HOST:PORT, e.g. 10.0.0.1:12355.")
    if args.num_processes is None or args.process_id is None:
        raise InputError("--coordinator_address needs --num_processes=N and --process_id=I.")
    if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
        raise InputError(f"--process_id={args.process_id} with --num_processes="
                         f"{args.num_processes}: process ids run from 0 to num_processes - 1.")
    if args.distributed_timeout < 1:
        raise InputError(f"--distributed_timeout={args.distributed_timeout}: expected seconds "
                         ">= 1.")


def initialize_distributed(args: argparse.Namespace) -> None:
    """jax.distributed.initialize, or one line and exit status 2 after the timeout.

    JAX aborts the process when its own deadline passes (a C++ fatal error with a stack
    dump); a watchdog thread ends the process a little earlier with a line a person reads.
    """
    import jax

    done = threading.Event()

    def watchdog() -> None:
        if not done.wait(args.distributed_timeout):
            print(f"Error: process {args.process_id} of {args.num_processes} could not join "
                  f"the run at --coordinator_address={args.coordinator_address} within "
                  f"{args.distributed_timeout} s: start every process with the same "
                  "--coordinator_address and --num_processes, check that the address is "
                  "reachable from every host, or raise --distributed_timeout.",
                  file=sys.stderr, flush=True)
            os._exit(2)

    threading.Thread(target=watchdog, daemon=True).start()
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                               initialization_timeout=args.distributed_timeout + 30)
    done.set()


def run(argv: Sequence[str]) -> int:
    """Runs the command line `argv` (without the program name); returns the exit status."""
    verbose = "--verbose" in argv
    try:
        args, overrides = parse(argv)
        from absl import logging

        if not args.verbose:
            logging.set_verbosity(logging.WARNING)  # library INFO chatter buries the progress
        _check_distributed(args)
        RunDir(args.workdir)  # refuses a workdir in use at once, before the slow imports
        config = config_lib.load(args.config)
        for key, value in overrides:
            config_lib.override(config, key, value)
        if args.coordinator_address:
            initialize_distributed(args)
        from tljax import train  # after distributed init: nothing may touch JAX before it

        train.train_and_evaluate(config, args.workdir, dry_run=args.dry_run)
    except (InputError, RunStopped) as e:
        return exit_status(e, verbose)
    return 0


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    from tljax.malloc import retain_freed_memory

    retain_freed_memory()
    main()
