"""tljax.malloc: when the program starts again with the malloc tunables, and what they buy."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from tljax import malloc

GLIBC = ("glibc", "2.36")
TUNABLES = ":".join(malloc.TUNABLES)


def test_the_tunables_are_added_to_the_users_own():
    assert malloc.restart_environment({"PATH": "/bin"}, GLIBC) == {"PATH": "/bin",
                                                                   "GLIBC_TUNABLES": TUNABLES}
    env = malloc.restart_environment({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}, GLIBC)
    assert env["GLIBC_TUNABLES"] == "glibc.rtld.nns=2:" + TUNABLES


@pytest.mark.parametrize("environ,libc", [
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=65536"}, GLIBC),  # the user's own malloc
    ({"GLIBC_TUNABLES": "glibc.rtld.nns=2:" + TUNABLES}, GLIBC),  # already started again
    ({}, ("glibc", "2.25")),  # before glibc had the malloc tunables
    ({}, ("", "")),           # musl or another C library
])
def test_no_restart_where_it_would_change_nothing(environ, libc):
    assert malloc.restart_environment(environ, libc) is None


# A child that calls retain_freed_memory() first, then (on a thread of its own, as XLA:CPU
# runs a step) mallocs, writes and frees 256 MiB ten times, and reports its page faults.
_CHILD = textwrap.dedent("""
    import ctypes, json, os, resource, sys, threading
    from tljax.malloc import retain_freed_memory
    print("started", os.getpid(), flush=True)
    retain_freed_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, (ctypes.c_void_p,)
    def steps():
        for _ in range(10):
            buffer = libc.malloc(256 << 20)
            ctypes.memset(buffer, 1, 256 << 20)
            libc.free(buffer)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    thread = threading.Thread(target=steps)
    thread.start()
    thread.join()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES", ""), "faults": faults,
                      "args": sys.argv[1:]}))
""")


def _child(tunables: str | None) -> tuple[list[str], dict]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    out = subprocess.run([sys.executable, "-c", _CHILD, "--flag=1"], env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout.splitlines()
    return [line for line in out if line.startswith("started")], json.loads(out[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux")
                    or malloc.restart_environment({}, platform.libc_ver()) is None,
                    reason="needs Linux and glibc >= 2.26")
def test_the_program_starts_again_and_stops_page_faulting():
    started, kept = _child(None)
    # Started twice (the same process, execve), with its arguments, now with the tunables.
    assert len(started) == 2 and started[0] == started[1], started
    assert kept["tunables"] == TUNABLES and kept["args"] == ["--flag=1"], kept
    # glibc's default, kept as the user set it: one start, and 256 MiB (65,536 pages of
    # 4 KiB) faulted in again at every one of the ten allocations.
    started_default, default = _child("glibc.malloc.mmap_max=65536")
    assert len(started_default) == 1, started_default
    assert default["faults"] > 10 * 60_000, default
    # With the tunables the memory is faulted in once and then reused.
    assert kept["faults"] < 2 * 65_536, (kept, default)
