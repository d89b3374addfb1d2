"""glibc malloc that keeps the memory a train step frees for the next step.

XLA:CPU allocates a compiled step's temporary buffers (the activations kept for the backward
pass and the workspace: 564 MB for the ViT-S/16 step of `tools/benchmark.py --suite=cpu`) with
malloc at every execution and frees them at its end. glibc serves a block that large with an
mmap of its own and frees it with munmap, so at every step the kernel maps the buffer in
again, zeroed, one 4 KiB page at a time: 145,000 page faults a step, a quarter of a 2-core
machine's time spent in the kernel. Three glibc tunables keep the memory instead:

  glibc.malloc.mmap_max=0             large blocks come from the heap, not from mmaps;
  glibc.malloc.arena_max=1            one heap for every thread (the per-thread arenas that
                                      glibc adds otherwise still mmap blocks above 64 MiB);
  glibc.malloc.trim_threshold=64 GiB  freed memory at the top of the heap is kept, not
                                      handed back to the kernel.

The buffer is then faulted in at the first step and reused by every later one: 0 faults a
step; on 2 cores the CPU benchmark's ViT-S/16 and EfficientNet-Lite0 steps run 1.1-1.2x
faster and `make run` 1.33x (README, "CPU train step"). The price: the process keeps its
peak heap until it exits, as a GPU framework's caching allocator keeps device memory, and a
heap shared by different workloads fragments (one process per training run, as here, is
what this is for). Transparent huge pages (`glibc.malloc.hugetlb=1`) fault the buffer in
2 MiB pages instead, but a step that follows other work then waits for the kernel to compact
memory (1.3-1.7 s instead of 0.85 s): not used.

glibc reads its tunables once, when a process starts, so `retain_freed_memory()` starts the
running program again (`os.execve`: the same process id, command line and environment, plus
the tunables) on Linux with glibc >= 2.26. The command-line entry points call it before
anything else (the test suite, one process training many models, does not). A GLIBC_TUNABLES
that already sets any `glibc.malloc.*` tunable is left as it is, so
`GLIBC_TUNABLES=glibc.malloc.mmap_max=65536` (glibc's default) keeps glibc's own behaviour.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from collections.abc import Mapping

TUNABLES = ("glibc.malloc.mmap_max=0", "glibc.malloc.arena_max=1",
            f"glibc.malloc.trim_threshold={64 << 30}")
MIN_GLIBC = (2, 26)  # the first glibc with the malloc tunables


def restart_environment(environ: Mapping[str, str],
                        libc: tuple[str, str]) -> dict[str, str] | None:
    """The environment to start the program again with, or None when there is nothing to do:
    not glibc >= 2.26 (`libc` as `platform.libc_ver()` gives it), or GLIBC_TUNABLES already
    sets a malloc tunable (the user's choice, or this program started again)."""
    name, version = libc
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if name != "glibc" or numbers < MIN_GLIBC:
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if any(item.startswith("glibc.malloc.") for item in tunables.split(":")):
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, *TUNABLES)))}


def retain_freed_memory() -> None:
    """Starts this program again with the malloc tunables above where they apply; returns
    without doing anything otherwise. Call it first thing in an entry point: nothing done
    before it survives the restart."""
    if not sys.platform.startswith("linux"):
        return
    environ = restart_environment(os.environ, platform.libc_ver())
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, environ)
    except OSError:  # cannot start again (e.g. no executable path): run on as we are
        return
