"""Regularisers for small data, each on vs off: Lite0 (ImageNet) -> 1,000 Fashion-MNIST labels.

    python -m tljax.sweep --sweep=experiments/regularisation.py --workdir=runs/regularisation

The baseline is the quickstart recipe at 48 px (experiments/common.py: full fine-tuning,
47 steps of 64, random flips); each other arm adds one regulariser to it:
  mixup            task.mixup = 0.2 (Beta(0.2, 0.2) mixing of images and one-hot targets)
  cutmix           task.cutmix = 1.0 (boxes pasted from another image, targets by area)
  label_smoothing  task.label_smoothing = 0.1
  randaugment      randaugment(2, 9) in the training pp (2 of 14 ops at magnitude 9)
  ema              ema_decay = 0.9 (warmed up; the average's accuracy in 'EMA'; 'test' is
                   the raw weights')
  early_stopping   best-checkpoint selection: train on the first 800 labels, evaluate the
                   other 200 every 6 steps, keep the best (patience 3); 'test' is the test
                   accuracy at the selected step
The ViT-only regulariser, stochastic depth, is experiments/stochastic_depth.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import BASE, EVAL_SPLIT, QUICKSTART, image_pp  # noqa: E402

CONFIG = QUICKSTART
SEEDS = [0, 1, 2]
COLUMNS = {"test": "test/accuracy|accuracy", "EMA": "ema/accuracy"}
DESCRIPTION = ("Regularisers on the 1,000-label quickstart (Lite0, 48 px, 47 steps): accuracy "
               "on 2,000 test images, each regulariser added alone to the baseline.")


def _task(**options):
    return {"task": {"name": "classification", "loss": "softmax_xent", **options}}


ARMS = {
    "baseline": {**BASE},
    "mixup": {**BASE, **_task(mixup=0.2)},
    "cutmix": {**BASE, **_task(cutmix=1.0)},
    "label_smoothing": {**BASE, **_task(label_smoothing=0.1)},
    "randaugment": {**BASE, "input.pp": image_pp("flip_lr", "randaugment(2, 9)")},
    "ema": {**BASE, "ema_decay": 0.9},
    "early_stopping": {**BASE, "input.split": "train[:800]", "eval.split": "train[800:1000]",
                       "extra_evals": {"test": {"split": EVAL_SPLIT}}, "eval_every_steps": 6,
                       "early_stopping": {"metric": "accuracy", "patience": 3}},
}
