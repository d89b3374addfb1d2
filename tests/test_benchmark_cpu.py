"""tools/benchmark_cpu.py: the machine's file name and the interleaving of the two systems."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import benchmark_cpu  # noqa: E402


def test_machine_name_is_short_and_file_safe():
    assert benchmark_cpu.machine_name("AMD EPYC", 2) == "amd-epyc-x2"
    assert (benchmark_cpu.machine_name("AMD EPYC 9654 96-Core Processor", 2)
            == "amd-epyc-9654-x2")
    assert (benchmark_cpu.machine_name("Intel(R) Xeon(R) CPU E5-2690 v4 @ 2.60GHz", 4)
            == "intel-xeon-e5-2690-v4-x4")
    assert benchmark_cpu.machine_name("???", None) == "cpu"


def test_systems_alternate_round_by_round():
    calls = []
    runs = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = benchmark_cpu.interleaved(runs, rounds=3, steps=2, warmup=1)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3
    assert {k: len(v) for k, v in times.items()} == {"a": 6, "b": 6}
    assert all(t >= 0 for v in times.values() for t in v)
