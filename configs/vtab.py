r"""VTAB-1k: ViT-B/16 (ImageNet-21k) on the 19 VTAB tasks, 1,000 labels each, one method.

The V-PETL benchmark protocol (224 px, no augmentation, batch 64, 100 epochs, AdamW with
cosine decay) on the VTAB-1k splits of tljax/data/vtab.py: `val` trains on train800 and
evaluates on val200 (choosing hyper-parameters), the default trains on all 1,000
(train800val200) and evaluates on the official test split. Needs the internet (TFDS
datasets, the big_vision checkpoint) or both prepared locally.

    python -m tljax.main --config=configs/vtab.py:task=cifar100,method=lora --workdir=runs/vtab/...
    python -m tljax.sweep --sweep=experiments/vtab.py --workdir=runs/vtab        # all 19 x methods
    python tools/compare_expected.py runs/vtab                                   # vs published

Arguments:
  task=NAME        one of the 19 tasks (tljax.data.vtab.TASKS); default cifar100.
  method=NAME      linear_probe | full | bitfit | lora: the freeze preset and its lr.
  init=PATH        the ViT-B/16 ImageNet-21k checkpoint (big_vision .npz, local or gs://).
  val              train on train800, evaluate on val200.

Published group means for ViT-B/16 IN-21k (V-PETL README; natural / specialized /
structured averaged, then the mean of the three groups; also the 19-task mean):
linear probe 57.6 (52.9), full fine-tune 69.0 (65.6), BitFit 65.2 (62.1), LoRA 74.6 (72.3).
Each run records its task's group in `expected.group` and these two numbers in
`expected.published`; tools/compare_expected.py puts the measured means next to them.
"""

import ml_collections

from tljax.config import nullable, parse_arg
from tljax.data import vtab

CHECKPOINT = "gs://vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz"
# method: (freeze preset, lr)
METHODS = {
    "linear_probe": ("linear_probe", 1e-3),
    "full": ("full", 1e-4),
    "bitfit": ("bitfit", 1e-3),
    "lora": ("lora(rank=8, alpha=8)", 1e-3),
}
# Published group means (and 19-task means) of each method: baselines.md, V-PETL.
PUBLISHED = {"linear_probe": (57.6, 52.9), "full": (69.0, 65.6), "bitfit": (65.2, 62.1),
             "lora": (74.6, 72.3)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, task="cifar100", method="lora", init=CHECKPOINT, val=False)
    if arg.task not in vtab.TASKS:
        from tljax.config import ConfigError, closest

        raise ConfigError(f"task={arg.task!r}: not a VTAB task{closest(arg.task, vtab.TASKS)}; "
                          f"tasks: {', '.join(vtab.TASKS)}.")
    if arg.method not in METHODS:
        from tljax.config import ConfigError

        raise ConfigError(f"method={arg.method!r}: expected one of {', '.join(METHODS)}.")
    task = vtab.TASKS[arg.task]
    freeze, lr = METHODS[arg.method]
    train = f"{task.train}[:800]" if "[" not in task.train else _first(task.train, 800)
    val = f"{task.val}[:200]" if "[" not in task.val else _first(task.val, 200)

    config = ml_collections.ConfigDict()
    config.seed = 0
    pixels = ("value_range(-1, 1, in_min=0, in_max=1)" if arg.task.startswith("dsprites")
              else "value_range(-1, 1)")
    pp = f"decode|vtab_label({arg.task!r})|resize(224)|rgb|{pixels}"
    config.input = dict(dataset=task.tfds, data_dir=nullable(str),
                        split=train if arg.val else f"{train}+{val}", batch_size=64, pp=pp)
    config.eval = dict(split=val if arg.val else task.test, pp=pp, batch_size=256)

    config.model_name = "vit"
    config.model = dict(variant="B/16", pool_type="tok")
    config.init = dict(source="big_vision", path=arg.init, dont_load=["^head/"], arch=None)
    config.task = dict(name="classification", loss="softmax_xent")

    config.optim = dict(name="adamw", b1=0.9, b2=0.999, weight_decay=1e-4)
    config.lr = lr
    config.lr_schedule = dict(decay_type="cosine", linear_end=0.0)
    config.grad_clip_norm = 1.0
    config.freeze = freeze
    config.schedule = nullable(list)
    config.llrd = nullable(float)
    config.lr_mults = nullable(list)
    config.wd_mults = nullable(list)
    config.unfreeze_warmup_steps = nullable(int)
    config.cache_features = arg.method == "linear_probe"  # no augmentation: cacheable
    config.compute_dtype = "float32"

    config.total_epochs = 100.0
    config.warmup_epochs = 10.0
    config.log_every_steps = 50
    config.checkpoint_every_steps = 500
    config.keep_checkpoints = 1
    config.mesh = [("data", -1)]
    config.sharding_rules = [(".*", "replicate")]
    config.expected = dict(metric="accuracy", value=None, tolerance=None,
                           source=f"V-PETL VTAB-1k, ViT-B/16 IN-21k, {arg.method}",
                           group=task.group, published=list(PUBLISHED[arg.method]))
    return config


def _first(split: str, n: int) -> str:
    """The first n examples of a sliced split, e.g. 'train[45000:]' -> 'train[45000:45200]'."""
    name, _, rest = split.partition("[")
    start = rest.rstrip("]").split(":")[0] or "0"
    if start.endswith("%"):
        raise ValueError(f"Cannot take the first {n} of {split!r}: give absolute indices.")
    return f"{name}[{start}:{int(start) + n}]"
