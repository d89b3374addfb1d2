"""The source model of the distribution-shift sweeps: Lite0 fine-tuned on clean data.

    python -m tljax.sweep --sweep=experiments/shift_source.py --workdir=runs/shift_source

EfficientNet-Lite0 (ImageNet) fine-tuned on 4,000 clean Fashion-MNIST labels (the first
4,000 training images; 2 epochs, 125 steps of 64, 48 px, otherwise the quickstart recipe).
experiments/surgical.py adapts it to shifted targets. Besides the clean test images it is
evaluated on every target domain of that sweep (corrupted test images, relabelled
classes): the "no adaptation" row of its table.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import BASE, QUICKSTART  # noqa: E402
from surgical import SHIFTS  # noqa: E402

CONFIG = QUICKSTART
SEEDS = [0]
COLUMNS = {"clean": "accuracy", **{name: f"{name}/accuracy" for name in SHIFTS}}
DESCRIPTION = ("Source model: Lite0 (ImageNet) fine-tuned on 4,000 clean Fashion-MNIST "
               "labels, evaluated on each target domain of experiments/surgical.py without "
               "adaptation.")
ARMS = {"source": {**BASE, "input.split": "train[:4000]", "total_epochs": 2.0,
                   "warmup_epochs": 0.25,
                   "extra_evals": {name: shift["eval"] for name, shift in SHIFTS.items()}}}
