"""Pieces the sweep files share: the small-budget quickstart, corrupted eval sets, block groups.

The image sweeps run the quickstart recipe (configs/quickstart.py: EfficientNet-Lite0 from
ImageNet, 1,000 Fashion-MNIST labels, AdamW 1e-3, cosine) with its earlier budget of 3 epochs
(47 steps of 64; `make run` now trains 5), at 48 px instead of 64 px, evaluated on the first
2,000 test images instead of 10,000, so that one run takes 1-3 minutes on 2 shared CPU cores
(3 epochs at 64 px on the full test split: 83.0%; at 48 px on test[:2000]: 82.5%).
"""

from __future__ import annotations

RES = 48
QUICKSTART = f"configs/quickstart.py:res={RES}"
VALUE_RANGE = "value_range(-0.9921875,1.0)"  # (x - 127) / 128, as the weights were trained
EVAL_SPLIT = "test[:2000]"
BASE = {"eval.split": EVAL_SPLIT, "log_every_steps": 10, "total_epochs": 3.0}  # 47 steps of 64


def image_pp(*ops: str, res: int = RES) -> str:
    """decode | OPS (on the 28 px uint8 image) | resize | rgb | the weights' value range."""
    return "|".join(["decode", *ops, f"resize({res})", "rgb", VALUE_RANGE])


# One corruption per family of CIFAR-10-C (tljax/data/corruptions.py), at severity 3, on the
# first 1,000 test images: the out-of-distribution sets of the LP-FT comparison.
OOD_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "fog", "contrast")
OOD_SEVERITY = 3
OOD_EVALS = {name: {"split": "test[:1000]",
                    "pp": image_pp(f"corrupt('{name}', {OOD_SEVERITY})")}
             for name in OOD_CORRUPTIONS}
OOD_COLUMNS = {"ID": "accuracy",
               "OOD mean": [f"{name}/accuracy" for name in OOD_CORRUPTIONS],
               **{name: f"{name}/accuracy" for name in OOD_CORRUPTIONS}}

# EfficientNet-Lite0's block groups (model.blocks(): stem, block0..block15, top, then the
# head): early = stem + stages 1-2 (stride <= 4), middle = stages 3-5 (blocks 3-10),
# late = stages 6-7 + the top convolution. The head is group 18.
LITE0_EARLY = [0, 1, 2, 3]
LITE0_MIDDLE = list(range(4, 12))
LITE0_LATE = list(range(12, 18))
