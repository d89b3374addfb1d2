"""Stochastic depth on a small ViT trained from scratch on 1,000 Fashion-MNIST labels.

    python -m tljax.sweep --sweep=experiments/stochastic_depth.py --workdir=runs/stochastic_depth

The ViT of configs/vit_finetune.py:runlocal (28 px, 7x7 patches, 3 blocks of width 96, no
pretrained weights are available offline) trained on the first 1,000 training images for
300 steps of 128 (38 epochs: it overfits), evaluated on 2,000 test images, with drop-path
rate r = 0 (off), 0.1 and 0.3 (block i of 3 drops each residual branch with probability
r * i / 2 per example).
"""

CONFIG = "configs/vit_finetune.py:runlocal"
SEEDS = [0, 1, 2]
METRIC = "accuracy"
DESCRIPTION = ("Stochastic depth: ViT (3 blocks, width 96) from scratch on 1,000 Fashion-MNIST "
               "labels, 300 steps; accuracy on 2,000 test images.")
_BASE = {"input.split": "train[:1000]", "eval.split": "test[:2000]", "total_steps": 300,
         "warmup_steps": 30, "eval_every_steps": 100, "checkpoint_every_steps": 100}
_MODEL = dict(patch_size=(7, 7), width=96, depth=3, mlp_dim=384, num_heads=3, pool_type="gap",
              dropout=0.0)  # runlocal's
ARMS = {f"drop_path={rate}": {**_BASE, "model": {**_MODEL, "drop_path_rate": rate}}
        for rate in (0.0, 0.1, 0.3)}
