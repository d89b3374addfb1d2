r"""Semantic segmentation: EfficientNet-Lite0 (ImageNet) with an FCN head, vs from scratch.

Offline by default on `fashion_scenes`, a seeded composition of real Fashion-MNIST images on
64 px canvases (11 classes: background + 10 garments; `python tools/prepare_data.py
fashion_scenes`, ~10 s). It is a composition of real images, not a segmentation benchmark.

    python -m tljax.main --config=configs/segmentation.py --workdir=runs/seg
    python -m tljax.main --config=configs/segmentation.py:init=scratch --workdir=runs/seg0
    python -m tljax.main --config=configs/segmentation.py:freeze=linear_probe --workdir=...
    python -m tljax.main --config=configs/segmentation.py:dataset=segfolder:/data/x --workdir=...
    python -m tljax.main --config=configs/segmentation.py:runlocal --workdir=runs/seg_local
    python tools/predict.py --workdir=runs/seg scene.png     # writes scene.pred.png

Arguments:
  init=pretrained|scratch   ImageNet EfficientNet-Lite0 weights, or the same budget from
                            random initialisation (batch statistics learned).
  model=efficientnet_lite0|resnet50|vit
                            the backbone: EfficientNet-Lite0 (multi-scale FCN over stages
                            2-5, strides 4-32), torchvision ResNet-50 (FCN over stages 1-4;
                            `resnet_weights=/resnet50.pth` for ImageNet weights, or
                            `resnet_weights=/fcn_resnet50_coco.pth` / `.../deeplabv3_...pth`
                            for torchvision's COCO segmentation models: dilated backbone,
                            their head, its classifier new) or a small ViT from scratch
                            (progressive decoder over patch tokens, 4 px patches).
  freeze=PRESET             full (default) or any freeze preset, e.g. linear_probe (the
                            backbone frozen, the head trained).
  dataset=NAME              fashion_scenes | segfolder:/root | decathlon:/TaskXX (see also
                            configs/medical_segmentation.py) | oxford_iiit_pet (TFDS, prepared
                            online; trimap border pixels ignored).
  res=PX                    input resolution (images and masks resized together).
  runlocal                  a short run for the test suite (train[:512], 60 steps).

Measured on the 500 test scenes after 200 steps of 32 (2 shared CPU cores):

    init=pretrained                  mIoU 58.1  Dice 71.6  (22.8 min)
    init=scratch                     mIoU 22.8  Dice 32.7  (23.0 min)
    freeze=linear_probe              mIoU 48.2  Dice 63.0  ( 3.9 min)
    all background                   mIoU  7.6
    runlocal (test[:200])            mIoU 37.9 (all background 7.6)
"""

import ml_collections

from tljax.config import nullable, parse_arg

VALUE_RANGE = "value_range(-0.9921875,1.0)"  # (x - 127) / 128, as the weights were trained
# torchvision's ResNets (and their FCOS / FCN / DeepLabV3) read ImageNet-normalised pixels.
IMAGENET = "normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))"
CLASSES = 11


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, init="pretrained", model="efficientnet_lite0", freeze="full",
                    dataset="fashion_scenes", res=64, resnet_weights="", runlocal=False)
    config = ml_collections.ConfigDict()
    config.seed = 0
    scale = IMAGENET if arg.model == "resnet50" else VALUE_RANGE
    common = f"decode|resize_dense({arg.res})|rgb|{scale}|drop('boxes','classes','image_id')"
    if arg.dataset.startswith("oxford_iiit_pet"):  # TFDS (prepared online): the trimap
        common = common.replace("decode|", "decode|pet_trimap|").replace(
            "'image_id'", "'image_id','label','species','file_name'")
    config.input = dict(dataset=arg.dataset, data_dir=nullable(str), split="train",
                        batch_size=32, pp=common.replace("|rgb|", "|flip_lr_dense|rgb|"))
    config.eval = dict(split="test", pp=common, batch_size=100)

    config.task = dict(name="segmentation", head="fcn", loss="xent", ignore_index=255)
    if arg.dataset.startswith("oxford_iiit_pet"):
        config.task.class_names = ("background", "pet")
    config.init = dict(source=nullable(str), path="", dont_load=["^head/"])
    if arg.model == "efficientnet_lite0":
        config.model_name = "efficientnet_lite"
        config.model = dict(variant="lite0", bn_update=False, dropout=0.0)
        config.task.head_input = ("stage_2", "stage_3", "stage_4", "stage_5")
        config.task.head_width = 64
        config.task.lateral_width = 64
        if arg.init == "pretrained":
            from tljax.pretrained.efficientnet import weights_file

            config.init.source = "efficientnet_lite"
            config.init.path = weights_file("lite0")
    elif arg.model == "resnet50":
        config.model_name = "resnet"
        config.model = dict(depth=50, bn_update=False)
        config.task.head_input = ("stage_1", "stage_2", "stage_3", "stage_4")
        config.task.head_width = 128
        if arg.init == "pretrained" and arg.resnet_weights:
            config.init.source, config.init.path = "torchvision", arg.resnet_weights
            kind = next((k for k in ("fcn", "deeplabv3") if k in arg.resnet_weights), None)
            if kind:  # torchvision's segmentation models, as converted
                config.init.source = "torchvision_dense"
                config.model.replace_stride_with_dilation = (False, True, True)
                config.task.head = kind
                config.task.head_input = ("stage_4",)
                del config.task.head_width
                config.init.dont_load = ["^head/classifier/"]
    elif arg.model == "vit":
        config.model_name = "vit"
        config.model = dict(patch_size=(4, 4), width=96, depth=4, mlp_dim=192, num_heads=3,
                            pool_type="tok")
        config.task.head, config.task.head_input = "vit", "tokens"
        config.task.decoder = "progressive"
        config.task.head_width = 64
    else:
        raise ValueError(f"model={arg.model!r}: expected efficientnet_lite0, resnet50 or vit.")
    if arg.init == "scratch" or not config.init.source:
        # Nothing pre-trained: batch statistics are learned, with a decay short enough for
        # the running averages to follow a short run.
        if "bn_update" in config.model:
            config.model.bn_update = True
        if arg.model == "efficientnet_lite0":
            config.model.bn_momentum = 0.9
    elif arg.init != "pretrained":
        raise ValueError(f"init={arg.init!r}: expected pretrained or scratch.")

    config.optim = dict(name="adamw", weight_decay=1e-4)
    config.lr = 2e-3
    config.lr_schedule = dict(decay_type="cosine", linear_end=0.0)
    config.grad_clip_norm = 1.0
    config.freeze = arg.freeze
    config.schedule = nullable(list)
    config.compute_dtype = "float32"

    config.total_steps = 200
    config.warmup_steps = 20
    config.log_every_steps = 25
    config.eval_every_steps = nullable(int)
    config.checkpoint_every_steps = 100
    config.keep_checkpoints = 1
    config.mesh = [("data", -1)]
    config.sharding_rules = [(".*", "replicate")]

    if arg.runlocal:
        config.input.split = "train[:512]"
        config.eval.split = "test[:200]"
        config.total_steps = 60
        config.warmup_steps = 5
        config.log_every_steps = 10
        config.checkpoint_every_steps = 60
    return config
