"""Measured next to published: every finished run under the given folders whose config has an
`expected` block.

    python tools/compare_expected.py runs/vtab runs/vit_c10 [--markdown]

Runs with a published number of their own (`expected.value`, e.g. the ViT paper's
CIFAR-10 98.95) get one row each: measured, published +- tolerance, within or not.
Runs of a benchmark of task groups (`expected.group`, e.g. VTAB-1k's natural /
specialized / structured) are averaged per `expected.source` (one method): the mean of
each group, the mean of the group means and the mean over tasks, next to
`expected.published` ([mean of group means, mean over tasks]). A benchmark with tasks
still missing says how many it has.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tljax.errors import InputError, report  # noqa: E402


def find_runs(roots: list[str]) -> list[tuple[Path, dict[str, Any], dict[str, Any]]]:
    """(workdir, config, results) of every finished run below `roots`."""
    runs = []
    for root in roots:
        if not os.path.isdir(root):
            raise InputError(f"No folder {root}.")
        for results_file in sorted(Path(root).rglob("results.json")):
            config_file = results_file.parent / "config.json"
            if config_file.exists():
                runs.append((results_file.parent, json.loads(config_file.read_text()),
                             json.loads(results_file.read_text())))
    return runs


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def compare(roots: list[str]) -> str:
    single, grouped = [], defaultdict(lambda: defaultdict(list))
    published: dict[str, Any] = {}
    for workdir, config, results in find_runs(roots):
        expected = config.get("expected") or {}
        metric = expected.get("metric") or results.get("main_metric", "accuracy")
        measured = 100 * results["final_eval"][metric]
        if expected.get("value") is not None:
            tolerance = expected.get("tolerance") or 0.0
            within = abs(measured - expected["value"]) <= tolerance
            single.append(f"| {workdir} | {metric} | {measured:.2f} | {expected['value']:.2f} "
                          f"+- {tolerance:g} | {'yes' if within else 'no'} |")
        elif expected.get("group"):
            source = expected.get("source", "?")
            grouped[source][expected["group"]].append(measured)
            published[source] = expected.get("published")
    lines = []
    if single:
        lines += ["| run | metric | measured | published | within |", "|---|---|---|---|---|",
                  *single, ""]
    if grouped:
        groups = sorted({g for by_group in grouped.values() for g in by_group})
        lines += [f"| benchmark | {' | '.join(groups)} | mean of groups | mean of tasks | "
                  "published (groups / tasks) | tasks |",
                  "|---|" + "---|" * (len(groups) + 4)]
        for source, by_group in grouped.items():
            means = [_mean(by_group[g]) for g in groups if by_group.get(g)]
            tasks = [v for values in by_group.values() for v in values]
            cells = [f"{_mean(by_group[g]):.1f}" if by_group.get(g) else "-" for g in groups]
            ref = published.get(source)
            ref_text = f"{ref[0]:.1f} / {ref[1]:.1f}" if ref else "-"
            lines.append(f"| {source} | {' | '.join(cells)} | {_mean(means):.1f} | "
                         f"{_mean(tasks):.1f} | {ref_text} | {len(tasks)} |")
    if not lines:
        raise InputError(f"No finished run with an `expected` block under {', '.join(roots)}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("roots", nargs="+", metavar="FOLDER", help="folders holding runs")
    args = parser.parse_args(argv)
    try:
        print(compare(args.roots))
    except InputError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
