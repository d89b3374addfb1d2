"""Freeze schedules: EfficientNet-Lite0 (ImageNet) -> 1,000 Fashion-MNIST labels, 3 seeds.

    python -m tljax.sweep --sweep=experiments/freeze_lite0.py --workdir=runs/freeze_lite0

Every arm is the quickstart recipe at 48 px (experiments/common.py: 47 steps of 64, AdamW,
warmup then cosine, frozen batch-norm statistics) with one freeze schedule. Arms that train
few parameters - the zero-initialised head alone, BitFit's biases and norms, LoRA's
adapters - take 10x the recipe's lr (1e-2), as such methods usually do; the LP phase of
LP-FT trains its head at that rate too (`lr_mults`), and `full_head10x` is full fine-tuning
with the same head rate, the control for it. Block groups of Lite0 (experiments/common.py):
early = stem + stages 1-2, middle = stages 3-5, late = stages 6-7 + top.

Besides the clean test images (ID), every run is evaluated on four corrupted copies of
1,000 test images (one corruption per CIFAR-10-C family at severity 3: OOD), which gives
the LP-FT comparison (Kumar et al. 2022) its ID and OOD columns.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    BASE,
    LITE0_EARLY,
    LITE0_LATE,
    LITE0_MIDDLE,
    OOD_COLUMNS,
    OOD_EVALS,
    QUICKSTART,
)

CONFIG = QUICKSTART
SEEDS = [0, 1, 2]
COLUMNS = OOD_COLUMNS
DESCRIPTION = ("EfficientNet-Lite0 (ImageNet) -> 1,000 Fashion-MNIST labels, 48 px, 47 steps: "
               "test accuracy on 2,000 clean test images (ID) and on 1,000 corrupted ones "
               "(OOD: gaussian noise, defocus blur, fog, contrast at severity 3).")

_BASE = {**BASE, "extra_evals": OOD_EVALS}
_HEAD_10X = [("^head/", 10.0)]


def _arm(**overrides):
    return {**_BASE, **{k.replace("__", "."): v for k, v in overrides.items()}}


def _surgical(groups):
    return f"surgical(blocks={groups})"


ARMS = {
    "full": _arm(freeze="full"),
    "full_head10x": _arm(freeze="full", lr_mults=_HEAD_10X),
    "linear_probe": _arm(freeze="linear_probe", lr=1e-2),
    "lp_ft": _arm(freeze="lp_ft(lp_steps=16)", lr_mults=_HEAD_10X),
    "last_1_blocks": _arm(freeze="last_k_blocks(1)"),
    "last_2_blocks": _arm(freeze="last_k_blocks(2)"),
    "last_4_blocks": _arm(freeze="last_k_blocks(4)"),
    "surgical_early": _arm(freeze=_surgical(LITE0_EARLY)),
    "surgical_middle": _arm(freeze=_surgical(LITE0_MIDDLE)),
    "surgical_late": _arm(freeze=_surgical(LITE0_LATE)),
    "bitfit": _arm(freeze="bitfit", lr=1e-2),
    "lora": _arm(freeze="lora(rank=8, alpha=16)", lr=1e-2),
    # ULMFiT-style unfreezing from the top in four phases of 12 steps (head; + late;
    # + middle; everything): one compiled step per phase rather than one per block.
    "gradual_unfreeze": _arm(freeze="full", schedule=[
        {"freeze": "linear_probe"},
        {"start_step": 12, "freeze": _surgical(LITE0_LATE)},
        {"start_step": 24, "freeze": _surgical(LITE0_MIDDLE + LITE0_LATE)},
        {"start_step": 36, "freeze": "full"}]),
    "full_llrd": _arm(freeze="full", llrd=0.85),
}
