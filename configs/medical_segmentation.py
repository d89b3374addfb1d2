r"""Medical segmentation on 2-D slices of Decathlon-layout volumes (NIfTI or DICOM).

    python -m tljax.main --config=configs/medical_segmentation.py:data=/data/Task09_Spleen \
        --workdir=runs/spleen
    python -m tljax.main --config=configs/medical_segmentation.py:data=/d/Task02_Heart,modality=mr
    python -m tljax.main --config=configs/medical_segmentation.py:data=...,freeze=linear_probe ...

`data` is a Medical Segmentation Decathlon task folder (imagesTr/, labelsTr/, dataset.json;
tljax.data.medical): its labelled cases are split by case (every fifth case is test), and
each axial slice is an example. EfficientNet-Lite0 with its ImageNet weights reads the
windowed slice repeated to three channels; an FCN head over stages 2-5 predicts every
label of dataset.json (background first). Loss: cross-entropy plus Dice (foreground classes
are small). No Decathlon data ships offline; the test suite runs this config on a tiny volume
it builds.

Arguments:
  data=PATH             the Decathlon task folder (required).
  modality=ct|mr        ct: window(level, width) in Hounsfield units; mr: per-slice
                        0.5..99.5 percentile scaling.
  level=40,width=400    the CT window (soft tissue; lung: level=-600,width=1500).
  res=PX                slices resized to PX x PX (images bilinear, labels nearest).
  init=pretrained|scratch, freeze=PRESET, steps=N, batch=N
  runlocal              a few steps for the test suite.
"""

import ml_collections

from tljax.config import nullable, parse_arg

VALUE_RANGE = "value_range(-0.9921875,1.0)"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, data="", modality="ct", level=40.0, width=400.0, res=128,
                    init="pretrained", freeze="full", steps=2000, batch=16, runlocal=False)
    if not arg.data:
        raise ValueError("Give the Decathlon task folder: configs/medical_segmentation.py:"
                         "data=/path/TaskXX_Name")
    if arg.modality == "ct":
        intensity = f"window({arg.level}, {arg.width})"
    elif arg.modality == "mr":
        intensity = "scale_intensity(0.5, 99.5)"
    else:
        raise ValueError(f"modality={arg.modality!r}: expected ct or mr.")
    config = ml_collections.ConfigDict()
    config.seed = 0
    common = (f"{intensity}|resize_dense({arg.res})|rgb|{VALUE_RANGE}|"
              "keep('image','segmentation')")
    config.input = dict(dataset=f"decathlon:{arg.data}", data_dir=nullable(str), split="train",
                        batch_size=arg.batch,
                        pp=common.replace("|rgb|", "|flip_lr_dense|rgb|"))
    config.eval = dict(split="test", pp=common, batch_size=32)

    config.model_name = "efficientnet_lite"
    config.model = dict(variant="lite0", bn_update=False, dropout=0.0)
    config.task = dict(name="segmentation", head="fcn", loss="xent+dice", ignore_index=255,
                       head_input=("stage_2", "stage_3", "stage_4", "stage_5"),
                       head_width=64, lateral_width=64)
    config.init = dict(source=nullable(str), path="", dont_load=["^head/"])
    if arg.init == "pretrained":
        from tljax.pretrained.efficientnet import weights_file

        config.init.source, config.init.path = "efficientnet_lite", weights_file("lite0")
    elif arg.init == "scratch":
        config.model.bn_update = True
        config.model.bn_momentum = 0.9
    else:
        raise ValueError(f"init={arg.init!r}: expected pretrained or scratch.")

    config.optim = dict(name="adamw", weight_decay=1e-4)
    config.lr = 1e-3
    config.lr_schedule = dict(decay_type="cosine", linear_end=0.0)
    config.grad_clip_norm = 1.0
    config.freeze = arg.freeze
    config.schedule = nullable(list)
    config.compute_dtype = "float32"

    config.total_steps = arg.steps
    config.warmup_steps = 50
    config.log_every_steps = 50
    config.eval_every_steps = nullable(int)
    config.checkpoint_every_steps = 500
    config.keep_checkpoints = 1
    config.mesh = [("data", -1)]
    config.sharding_rules = [(".*", "replicate")]

    if arg.runlocal:
        config.total_steps = 6
        config.warmup_steps = 1
        config.log_every_steps = 2
        config.checkpoint_every_steps = 6
    return config
