"""Freeze schedules on a transformer: all-MiniLM-L6-v2 -> BBC News (5 classes), 3 seeds.

    python -m tljax.sweep --sweep=experiments/freeze_minilm.py --workdir=runs/freeze_minilm

configs/text_finetune.py's recipe shortened for 2 shared CPU cores: 64 tokens per article
(title and first lines), 24 steps of 32 (768 articles, 0.43 epoch) with 3 warmup steps,
AdamW lr 1e-4 with the zero-initialised head at 100x (1e-2), evaluated on the 441 test
articles. The linear probe is the config's own probe recipe (lr 0.03, no dropout); BitFit
and LoRA, which train few parameters, take 10x the lr (1e-3; their head stays at 1e-2).
Block groups (model.blocks()): embeddings, layer_0..layer_5, head; early = embeddings +
layers 0-1, middle = layers 2-3, late = layers 4-5. A run takes 2-3 minutes on 2 idle
cores (39 runs).
"""

CONFIG = "configs/text_finetune.py:max_len=64"
SEEDS = [0, 1, 2]
METRIC = "accuracy"
DESCRIPTION = ("all-MiniLM-L6-v2 -> BBC News, 64 tokens, 24 steps of 32: accuracy on the 441 "
               "test articles.")

_BASE = {"total_steps": 24, "warmup_steps": 3, "log_every_steps": 6}
_FEW = {"lr": 1e-3, "lr_mults": [("^head/", 10.0)]}  # head at 1e-2, as in the recipe
EARLY, MIDDLE, LATE = [0, 1, 2], [3, 4], [5, 6]


def _arm(**overrides):
    return {**_BASE, **overrides}


ARMS = {
    "full": _arm(freeze="full"),
    "linear_probe": _arm(config="configs/text_finetune.py:max_len=64,freeze=linear_probe"),
    "lp_ft": _arm(freeze="lp_ft(lp_steps=8)"),
    "last_1_blocks": _arm(freeze="last_k_blocks(1)"),
    "last_2_blocks": _arm(freeze="last_k_blocks(2)"),
    "last_4_blocks": _arm(freeze="last_k_blocks(4)"),
    "surgical_early": _arm(freeze=f"surgical(blocks={EARLY})"),
    "surgical_middle": _arm(freeze=f"surgical(blocks={MIDDLE})"),
    "surgical_late": _arm(freeze=f"surgical(blocks={LATE})"),
    "bitfit": _arm(freeze="bitfit", **_FEW),
    "lora": _arm(freeze="lora(rank=8, alpha=16)", **_FEW),
    # Unfreezing from the top in four phases of 6 steps: head; + late; + middle; all.
    "gradual_unfreeze": _arm(freeze="full", schedule=[
        {"freeze": "linear_probe"},
        {"start_step": 6, "freeze": f"surgical(blocks={LATE})"},
        {"start_step": 12, "freeze": f"surgical(blocks={MIDDLE + LATE})"},
        {"start_step": 18, "freeze": "full"}]),
    "full_llrd": _arm(freeze="full", llrd=0.8),
}
