"""Surgical fine-tuning (Lee et al., ICLR 2023) at small scale: which block group to tune
for an input-level shift (corrupted images) and an output-level shift (relabelled classes).

    python -m tljax.sweep --sweep=experiments/shift_source.py --workdir=runs/shift_source && \
    python -m tljax.sweep --sweep=experiments/surgical.py --workdir=runs/surgical

Source: Lite0 fine-tuned on 4,000 clean Fashion-MNIST labels (experiments/shift_source.py,
its head kept). Target: 500 other training images (train[50000:50500]) of a shifted domain,
5 epochs (40 steps of 64) from the source weights, evaluated on 2,000 test images of the
same domain. Domains:
  gaussian_noise, defocus_blur, contrast  corrupt(NAME, 5) on train and test images (input
                                          level: the paper's CIFAR-10-C analogue);
  relabel                                 clean images, class c labelled 9 - c (output
                                          level: the paper's label-flip analogue).
Arms, as in the paper's Table 1: tune only the first block group (stem + stages 1-2, head
frozen), only the last layer (the head) or all layers. The head-only arm takes 10x the lr
(1e-2), as in experiments/freeze_lite0.py; the others the recipe's 1e-3.
Paper ordering (ResNet-26, CIFAR-10 -> CIFAR-10-C / CIFAR-Flip): input-level shift, first
block > all > last layer; output-level shift, last layer > all > first block.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import BASE, EVAL_SPLIT, LITE0_EARLY, QUICKSTART, image_pp  # noqa: E402

SOURCE = os.environ.get("TLJAX_SHIFT_SOURCE", "runs/shift_source/source/seed_0")
FLIP = [9 - c for c in range(10)]


def _domain(*ops: str) -> dict:
    return {"train": image_pp(*ops, "flip_lr"), "eval": {"split": EVAL_SPLIT,
                                                         "pp": image_pp(*ops)}}


SHIFTS = {
    **{name: _domain(f"corrupt('{name}', 5)")
       for name in ("gaussian_noise", "defocus_blur", "contrast")},
    "relabel": _domain(f"relabel({FLIP})"),
}
TUNE = {  # arm: (freeze, lr)
    "first": (f"surgical(blocks={LITE0_EARLY}, head=False)", 1e-3),
    "last": ("linear_probe", 1e-2),
    "all": ("full", 1e-3),
}

CONFIG = QUICKSTART
SEEDS = [0, 1, 2]
METRIC = "accuracy"
DESCRIPTION = ("Surgical fine-tuning: Lite0 source (4,000 clean labels) adapted with 500 "
               "labels of a shifted domain; accuracy on 2,000 test images of that domain.")
ARMS = {
    f"{shift}-{arm}": {
        **BASE, "init.source": "tljax", "init.path": SOURCE, "init.dont_load": [],
        "input.split": "train[50000:50500]", "input.pp": domain["train"],
        "eval.split": domain["eval"]["split"], "eval.pp": domain["eval"]["pp"],
        "total_epochs": 5.0, "freeze": freeze, "lr": lr}
    for shift, domain in SHIFTS.items() for arm, (freeze, lr) in TUNE.items()}
