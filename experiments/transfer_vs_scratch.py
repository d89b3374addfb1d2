"""What pretraining buys: EfficientNet-Lite0 from ImageNet vs from scratch, same budget.

    python experiments/transfer_vs_scratch.py [--workdir=runs/quickstart] [--labels=1000] [--ci]

Runs configs/quickstart.py twice through the one trainer (init=pretrained, then
init=scratch), each evaluated on the full Fashion-MNIST test split, and prints
the two accuracies side by side. WORKDIR/report.json keeps them.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))

import quickstart  # noqa: E402

from tljax.errors import InputError, RunStopped, exit_status  # noqa: E402
from tljax.malloc import retain_freed_memory  # noqa: E402
from tljax.train import train_and_evaluate  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "runs/quickstart", "Where both runs go.")
_LABELS = flags.DEFINE_integer("labels", 1000, "Labelled training images.")
_CI = flags.DEFINE_bool("ci", False, "A shrunk run for the test suite.")


def run_both(workdir: str, labels: int, ci: bool = False) -> dict:
    report = {}
    for init in ("pretrained", "scratch"):
        arg = f"init={init},labels={labels}" + (",ci" if ci else "")
        config = quickstart.get_config(arg)
        print(f"\n=== EfficientNet-Lite0, {init} init: {config.input.split} of fashion_mnist, "
              f"eval on {config.eval.split} ===", flush=True)
        start = time.perf_counter()
        final = train_and_evaluate(config, os.path.join(workdir, init))
        report[init] = {**final, "seconds": time.perf_counter() - start}
    report["labels"] = labels
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def format_report(report: dict) -> str:
    rows = [f"{'init':<12}{'test accuracy':>15}{'test loss':>11}{'wall time':>11}"]
    for init in ("pretrained", "scratch"):
        r = report[init]
        rows.append(f"{init:<12}{100 * r['accuracy']:>14.2f}%{r['loss']:>11.3f}"
                    f"{r['seconds']:>10.0f}s")
    gain = 100 * (report["pretrained"]["accuracy"] - report["scratch"]["accuracy"])
    rows.append(f"Transfer from ImageNet adds {gain:+.1f} points with "
                f"{report['labels']:,} labelled images.")
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        report = run_both(_WORKDIR.value, _LABELS.value, _CI.value)
    except (InputError, RunStopped) as e:  # one line, as from python -m tljax.main
        sys.exit(exit_status(e))
    print("\n" + format_report(report))


if __name__ == "__main__":
    retain_freed_memory()
    app.run(main)
