"""What pretraining buys on speech: configs/audio.py pretrained vs scratch, task by task.

    python experiments/audio_transfer.py [--workdir=runs/audio] [--tasks=keywords,speaker,language]
                                         [--variants=lite0,lite0_scratch,ge2e_probe,...]
                                         [--runlocal]

Each (task, variant) is one run of configs/audio.py through the one trainer, in
WORKDIR/<task>/<variant>, evaluated on the task's whole test split; the table puts them side by
side and WORKDIR/report.json keeps them. A finished run is read back, not repeated, so an
interrupted sweep continues where it stopped. Variants (config arguments):

  lite0          model=efficientnet_lite0,init=pretrained   ImageNet EfficientNet-Lite0
  lite0_scratch  model=efficientnet_lite0,init=scratch      same network and budget, random init
  ge2e_probe     model=ge2e,freeze=linear_probe             frozen GE2E speaker encoder + head
  ge2e_full      model=ge2e,freeze=full                     GE2E fine-tuned end to end
  ge2e_scratch   model=ge2e,init=scratch                    the GE2E LSTM from random init
  resnet_scratch model=resnet,init=scratch                  ResNet-18 from random init
  vit_scratch    model=vit,init=scratch                     a 6-block ViT from random init

The default is the first five; the last two (no ImageNet ResNet or ViT is reachable offline)
only on request.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))

import audio  # noqa: E402  (configs/audio.py)

from tljax.malloc import retain_freed_memory  # noqa: E402
from tljax.train import train_and_evaluate  # noqa: E402

VARIANTS = {
    "lite0": "model=efficientnet_lite0,init=pretrained",
    "lite0_scratch": "model=efficientnet_lite0,init=scratch",
    "ge2e_probe": "model=ge2e,freeze=linear_probe",
    "ge2e_full": "model=ge2e,freeze=full",
    "ge2e_scratch": "model=ge2e,init=scratch",
    "resnet_scratch": "model=resnet,init=scratch",
    "vit_scratch": "model=vit,init=scratch",
}
DEFAULT_VARIANTS = list(VARIANTS)[:5]

_WORKDIR = flags.DEFINE_string("workdir", "runs/audio", "Where the runs go.")
_TASKS = flags.DEFINE_list("tasks", list(audio.TASKS), "Tasks of configs/audio.py.")
_VARIANTS = flags.DEFINE_list("variants", DEFAULT_VARIANTS, f"Of {', '.join(VARIANTS)}.")
_RUNLOCAL = flags.DEFINE_bool("runlocal", False, "The shortened CI recipes.")


def run(task: str, variant: str, workdir: str, runlocal: bool = False) -> dict:
    """Final metrics (+ 'seconds') of one run; read back when it already finished."""
    done_file = os.path.join(workdir, "sweep.json")
    arg = f"task={task},{VARIANTS[variant]}" + (",runlocal" if runlocal else "")
    if os.path.exists(done_file):
        with open(done_file) as f:
            done = json.load(f)
        if done["arg"] == arg:
            return done["final"]
    config = audio.get_config(arg)
    print(f"\n=== {task}: {variant} ({arg}) ===", flush=True)
    start = time.perf_counter()
    final = {**train_and_evaluate(config, workdir), "seconds": time.perf_counter() - start}
    with open(done_file, "w") as f:
        json.dump({"arg": arg, "final": final}, f, indent=2)
    return final


def format_report(report: dict) -> str:
    """One row per task: test accuracy (and wall time) of every variant."""
    variants = [v for v in VARIANTS if any(v in r for r in report.values())]
    rows = [f"{'task':<10}" + "".join(f"{v:>22}" for v in variants)]
    for task, results in report.items():
        cells = []
        for v in variants:
            r = results.get(v)
            cells.append(f"{100 * r['accuracy']:>13.1f}% ({r['seconds'] / 60:4.1f}m)" if r
                         else f"{'-':>22}")
        rows.append(f"{task:<10}" + "".join(cells))
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"Unknown variants {unknown}; known: {', '.join(VARIANTS)}.")
    report_file = os.path.join(_WORKDIR.value, "report.json")
    report: dict = {}
    if os.path.exists(report_file):  # earlier sweeps into the same workdir stay in the table
        with open(report_file) as f:
            report = json.load(f)
    for task in _TASKS.value:
        for variant in _VARIANTS.value:
            result = run(task, variant, os.path.join(_WORKDIR.value, task, variant),
                         _RUNLOCAL.value)
            report.setdefault(task, {})[variant] = result
            os.makedirs(_WORKDIR.value, exist_ok=True)
            with open(report_file, "w") as f:
                json.dump(report, f, indent=2)
    print("\n" + format_report(report))


if __name__ == "__main__":
    retain_freed_memory()
    app.run(main)
