"""VTAB-1k: the 19 tasks x four methods with ViT-B/16 (ImageNet-21k), the V-PETL protocol.

    python -m tljax.sweep --sweep=experiments/vtab.py --workdir=runs/vtab --parallel=1
    python tools/compare_expected.py runs/vtab

Needs the internet (TFDS datasets and the big_vision checkpoint) or both prepared locally;
on a GPU a run takes minutes, on 2 CPU cores hours, so it is not run here.
"""

from tljax.data.vtab import TASKS

CONFIG = "configs/vtab.py"
SEEDS = [0]
METRIC = "accuracy"
DESCRIPTION = "VTAB-1k, ViT-B/16 IN-21k, test accuracy per task and method."
ARMS = {f"{task}-{method}": {"config": f"configs/vtab.py:task={task},method={method}"}
        for method in ("linear_probe", "full", "bitfit", "lora") for task in TASKS}
