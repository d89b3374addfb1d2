r"""Object detection: FCOS on EfficientNet-Lite0 (ImageNet), vs the same from scratch.

Offline by default on `fashion_scenes`, a seeded composition of real Fashion-MNIST images on
64 px canvases (10 classes, 1-3 boxes per image; `python tools/prepare_data.py
fashion_scenes`, ~10 s). It is a composition of real images, not a detection benchmark.

    python -m tljax.main --config=configs/detection.py --workdir=runs/det
    python -m tljax.main --config=configs/detection.py:init=scratch --workdir=runs/det0
    python -m tljax.main --config=configs/detection.py:freeze=linear_probe --workdir=...
    python -m tljax.main --config=configs/detection.py:dataset=coco:/im,/a.json,/im2,/b.json ...
    python -m tljax.main --config=configs/detection.py:runlocal --workdir=runs/det_local
    python tools/predict.py --workdir=runs/det scene.png     # writes scene.pred.png

Arguments:
  init=pretrained|scratch   ImageNet EfficientNet-Lite0 weights (FPN and heads new), or the
                            same budget from random initialisation.
  model=efficientnet_lite0|resnet50
                            EfficientNet-Lite0 (FPN over stages 3-5) or torchvision ResNet-50
                            (FPN over stages 2-4; `weights=/fcos_resnet50_fpn.pth` starts
                            from torchvision's COCO FCOS, its 91-class logits left out, or
                            `weights=/resnet50.pth` from ImageNet).
  freeze=PRESET             full (default) or any freeze preset; linear_probe freezes the
                            backbone and trains FPN and heads.
  dataset=NAME              fashion_scenes | coco:/images,/train.json[,/images,/test.json] |
                            a TFDS set with objects (coco/2017, voc/2007; prepared online,
                            then e.g. res=512,max_boxes=100 and eval.split=validation)
  res=PX                    input resolution (images and boxes resized together).
  max_boxes=N               boxes per image after padding (8).
  runlocal                  a short run for the test suite (train[:512], 80 steps).

FPN width 64 and two convolutions per tower (torchvision: 256 and 4) keep a step cheap on
2 CPU cores. Measured on the 500 test scenes after 300 steps of 32 (2 shared CPU cores):

    init=pretrained                  mAP 55.5  mAP@.5 69.3  (15.8 min)
    init=scratch                     mAP 18.3  mAP@.5 28.9  (18.9 min)
    freeze=linear_probe              mAP 56.6  mAP@.5 73.9  ( 8.8 min)
    empty prediction                 mAP  0
    runlocal (test[:200])            mAP 15.5  mAP@.5 22.1
"""

import ml_collections

from tljax.config import nullable, parse_arg

VALUE_RANGE = "value_range(-0.9921875,1.0)"  # (x - 127) / 128, as the weights were trained
# torchvision's ResNets (and their FCOS / FCN / DeepLabV3) read ImageNet-normalised pixels.
IMAGENET = "normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, init="pretrained", model="efficientnet_lite0", freeze="full",
                    dataset="fashion_scenes", res=64, max_boxes=8, weights="", runlocal=False)
    config = ml_collections.ConfigDict()
    config.seed = 0
    scale = IMAGENET if arg.model == "resnet50" else VALUE_RANGE
    common = (f"decode|resize_dense({arg.res})|rgb|{scale}|"
              f"drop('segmentation','image_id')|pad_boxes({arg.max_boxes})")
    if not arg.dataset.startswith(("fashion_scenes", "coco:")):  # TFDS coco/2017, voc/2007
        common = (f"decode|tfds_objects|resize_dense({arg.res})|rgb|{scale}|"
                  f"pad_boxes({arg.max_boxes})|keep('image','boxes','classes','box_mask')")
    config.input = dict(dataset=arg.dataset, data_dir=nullable(str), split="train",
                        batch_size=32, pp=common.replace("|rgb|", "|flip_lr_dense|rgb|"))
    config.eval = dict(split="test", pp=common, batch_size=50)

    config.task = dict(name="detection", fpn_width=64, head_convs=2, gn_groups=16,
                       score_threshold=0.05, pre_nms_top_k=100, max_detections=20)
    config.init = dict(source=nullable(str), path="", dont_load=["^head/"])
    if arg.model == "efficientnet_lite0":
        config.model_name = "efficientnet_lite"
        config.model = dict(variant="lite0", bn_update=False, dropout=0.0)
        config.task.head_input = ("stage_3", "stage_4", "stage_5")
        if arg.init == "pretrained":
            from tljax.pretrained.efficientnet import weights_file

            config.init.source = "efficientnet_lite"
            config.init.path = weights_file("lite0")
    elif arg.model == "resnet50":
        config.model_name = "resnet"
        config.model = dict(depth=50, bn_update=False)
        config.task.head_input = ("stage_2", "stage_3", "stage_4")
        if arg.init == "pretrained" and arg.weights:
            config.init.source, config.init.path = "torchvision", arg.weights
            if "fcos" in arg.weights:
                # torchvision's COCO FCOS: everything but its 91-class logits.
                config.init.source = "torchvision_dense"
                config.task.update(fpn_width=256, head_convs=4, gn_groups=32)
                config.init.dont_load = ["^head/classification/cls_logits/"]
    else:
        raise ValueError(f"model={arg.model!r}: expected efficientnet_lite0 or resnet50.")
    if arg.init == "scratch" or not config.init.source:
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

    config.total_steps = 300
    config.warmup_steps = 20
    config.log_every_steps = 25
    config.eval_every_steps = nullable(int)
    config.checkpoint_every_steps = 150
    config.keep_checkpoints = 1
    config.mesh = [("data", -1)]
    config.sharding_rules = [(".*", "replicate")]

    if arg.runlocal:
        config.input.split = "train[:512]"
        config.eval.split = "test[:200]"
        config.total_steps = 80
        config.warmup_steps = 5
        config.log_every_steps = 10
        config.checkpoint_every_steps = 80
    return config
