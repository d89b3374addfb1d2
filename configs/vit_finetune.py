r"""ViT fine-tuning: the ViT paper's transfer recipe (Dosovitskiy et al. 2021, App. B.1.1).

Without arguments: ViT-B/16 pre-trained on ImageNet-21k, fine-tuned on CIFAR-10
at 384 px for 10k steps of 512 with SGD momentum 0.9, cosine decay after 500
warmup steps, no weight decay, global-norm clipping at 1.0, zero-initialised
head, inputs in [-1, 1]; the paper reports 98.95% top-1 (Table 5).

    python -m tljax.main --config=configs/vit_finetune.py --workdir=/tmp/vit_c10
    python -m tljax.main --config=configs/vit_finetune.py:model=L/16,dataset=cifar100 ...
    python -m tljax.main --config=configs/vit_finetune.py:freeze=linear_probe ...
    python -m tljax.main --config=configs/vit_finetune.py:runlocal --workdir=/tmp/local

Arguments (comma-separated after the file name):
  model=Ti/16|S/16|B/16|L/16|...   ViT variant (NAME/PATCH).
  dataset=NAME                     a key of DATASETS below (per-dataset recipe).
  freeze=PRESET                    a one-argument freeze preset (tljax.freeze), e.g.
                                   linear_probe, last_k_blocks(2), lp_ft(lp_steps=500);
                                   presets with commas: --config.freeze='lora(8, 16)'.
  val                              select hyper-parameters: train on the first 98%
                                   (90% for Pets/Flowers) of train, evaluate on the rest.
  runlocal                         a from-scratch tiny ViT on Fashion-MNIST at 32 px
                                   that finishes in under 3 minutes on 2 CPU cores.
"""

import ml_collections

from tljax.config import ConfigError, closest, nullable, parse_arg

# name: steps, lr, held-out share of train for `val`, test split, expected top-1 of
# ViT-B/16 (ImageNet-21k, 384 px; paper Table 5) with its tolerance.
DATASETS = {
    "cifar10": dict(steps=10_000, lr=0.03, holdout=2, test="test", expected=(98.95, 0.3)),
    "cifar100": dict(steps=10_000, lr=0.03, holdout=2, test="test", expected=(91.67, 0.3)),
    "oxford_iiit_pet": dict(steps=500, lr=0.003, holdout=10, test="test", expected=(94.43, 0.5)),
    "oxford_flowers102": dict(steps=500, lr=0.003, holdout=10, test="test",
                              expected=(99.38, 0.5)),
    "imagenet2012": dict(steps=20_000, lr=0.03, holdout=1, test="validation",
                         expected=(83.97, 0.3)),
    "fashion_mnist": dict(steps=2_000, lr=0.01, holdout=2, test="test", expected=None),
}

# ImageNet-21k pre-trained checkpoints of the paper (vit_jax layout).
CHECKPOINTS = {
    "Ti/16": "gs://vit_models/augreg/Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz",
    "S/16": "gs://vit_models/augreg/S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz",
    "B/16": "gs://vit_models/imagenet21k/ViT-B_16.npz",
    "B/32": "gs://vit_models/imagenet21k/ViT-B_32.npz",
    "L/16": "gs://vit_models/imagenet21k/ViT-L_16.npz",
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, model="B/16", dataset="cifar10", freeze="full", val=False,
                    runlocal=False)
    if arg.runlocal:
        arg.dataset = "fashion_mnist"
    if arg.dataset not in DATASETS:
        raise ConfigError(f"dataset={arg.dataset!r}{closest(arg.dataset, DATASETS, 'value')}: this "
                          f"recipe knows {', '.join(DATASETS)}.")
    recipe = DATASETS[arg.dataset]
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Data: inception crop + flip for training, a plain resize for evaluation.
    res = 384
    holdout = 100 - recipe["holdout"]
    config.input = dict(
        dataset=arg.dataset,
        data_dir=nullable(str),  # default: $TFDS_DATA_DIR or ~/tensorflow_datasets
        split=f"train[:{holdout}%]" if arg.val else "train",
        batch_size=512,
        pp=f"decode|inception_crop({res})|flip_lr|rgb|value_range(-1,1)",
        workers=nullable(int),  # processes building batches (None: $TLJAX_DATA_WORKERS or 0)
    )
    config.eval = dict(
        split=f"train[{holdout}%:]" if arg.val else recipe["test"],
        pp=f"decode|resize({res})|rgb|value_range(-1,1)",
        batch_size=512,
    )

    # Model: the pre-trained ViT, its head replaced by a zero-initialised one.
    config.model_name = "vit"
    # attention: 'xla' anywhere, 'cudnn' (flash attention) on NVIDIA GPUs with bfloat16;
    # remat: None or a policy ('full', 'dots', 'dots_no_batch') to trade compute for memory.
    config.model = dict(variant=arg.model, pool_type="tok", representation_size=nullable(int),
                        dropout=0.0, attention="xla", remat=nullable(str), scan=False)
    config.init = dict(source="vit_jax", path=CHECKPOINTS.get(arg.model, ""),
                       dont_load=["^head/", "^pre_logits/"], arch=nullable(str),
                       step=nullable(int))

    # Optimisation.
    config.task = dict(name="classification", loss="softmax_xent")
    config.optim = dict(name="sgd", momentum=0.9)
    config.lr = recipe["lr"]
    config.lr_schedule = dict(decay_type="cosine", linear_end=0.0)
    config.grad_clip_norm = 1.0
    config.freeze = arg.freeze
    config.schedule = nullable(list)
    config.llrd = nullable(float)
    config.lr_mults = nullable(list)
    config.wd_mults = nullable(list)
    config.unfreeze_warmup_steps = nullable(int)
    config.cache_features = False
    config.compute_dtype = "float32"
    config.accum_steps = 1  # microbatches per step (input.batch_size stays the update's batch)

    # Durations: exactly one unit per line; the others stay None.
    config.total_steps = recipe["steps"]
    config.warmup_steps = 100 if recipe["steps"] <= 500 else 500
    config.log_every_steps = 50
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 2

    config.mesh = [("data", -1)]
    config.sharding_rules = [(".*", "replicate")]
    if recipe["expected"] and arg.model == "B/16" and arg.freeze == "full" and not arg.val:
        value, tolerance = recipe["expected"]
        config.expected = dict(metric="accuracy", value=value, tolerance=tolerance,
                               source="Dosovitskiy et al. 2021, Table 5 (ViT-B/16, ImageNet-21k)")

    if arg.runlocal:
        # From scratch (no hub offline): 28 px, 7x7 patches (16 tokens), 3 blocks of
        # width 96. 600 steps of 128 plus two evaluations on all 10,000 test images take
        # under 3 minutes on 2 CPU cores and reach ~83% top-1.
        config.init = dict(source=nullable(str), path="", dont_load=[],
                           arch=nullable(str), step=nullable(int))
        config.model = dict(patch_size=(7, 7), width=96, depth=3, mlp_dim=384, num_heads=3,
                            pool_type="gap", dropout=0.0, attention="xla", remat=nullable(str),
                            scan=False)
        config.input.batch_size = 128
        config.input.pp = "decode|flip_lr|rgb|value_range(-1,1)"
        config.eval.pp = "decode|rgb|value_range(-1,1)"
        config.eval.batch_size = 500
        config.optim = dict(name="adamw", b2=0.999, weight_decay=1e-4)
        config.lr = 1e-3
        config.total_steps = 600
        config.warmup_steps = 50
        config.log_every_steps = 50
        config.eval_every_steps = 300
        config.checkpoint_every_steps = 200
    return config
