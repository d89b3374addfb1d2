"""resemblyzer's pretrained GE2E speaker encoder -> `tljax.models.ge2e.GE2E`, and its front end.

Weights: `resemblyzer/pretrained.pt` of the PyPI package `resemblyzer` 0.1.4 (Apache-2.0;
17 MB), a legacy (non-zip) torch pickle `{'step', 'model_state', 'optimizer_state'}`. It is
read with `torch.load(weights_only=True)` (tljax.pretrained.readers.read_torch), whose
restricted unpickler reads this legacy stream as well as zip archives and refuses any global
other than tensors and plain containers, so no pickled code can run. Only the package's
*location* is looked up: nothing of resemblyzer is imported (it needs webrtcvad and librosa).

Name mapping (torch `VoiceEncoder` -> tljax, see tljax.models.ge2e): `lstm.weight_ih_l{l}` ->
`lstm_{l}/ih/kernel` (transposed), `lstm.bias_ih_l{l}` -> `lstm_{l}/ih/bias`, likewise `hh`;
`linear.weight` -> `linear/kernel` (transposed), `linear.bias` -> `linear/bias`. The GE2E
loss's scalars `similarity_weight` / `similarity_bias` belong to training, not to the encoder,
and are skipped on purpose; any other extra, missing or mis-shaped tensor raises.

Front end (`FRONTEND`, resemblyzer's hparams): 16 kHz mono; RMS raised to -30 dBFS when below
(`normalize_volume(increase_only=True)`); mel spectrogram = librosa's `melspectrogram` with
n_fft 400 (25 ms), hop 160 (10 ms), 40 Slaney mel bands, Hann window, centred frames with zero
padding (librosa >= 0.10's default), power 2, no log. resemblyzer's `preprocess_wav` also cuts
long silences with the webrtcvad voice detector; that step is not reimplemented here: pass
audio without long pauses, or trim it first. An utterance is embedded as resemblyzer's
`embed_utterance` does: 160-frame (1.6 s) windows every round(16000 / 1.3 / 160) = 77 frames,
the last kept when it covers >= 75% of its window, the audio zero-padded to the last window;
the embedding is the L2-normalised mean of the windows' embeddings.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tljax import tree
from tljax.data import audio
from tljax.models import ge2e as ge2e_lib
from tljax.pretrained import readers
from tljax.pretrained.info import PretrainedInfo
from tljax.pretrained.loading import CheckpointMismatchError, format_mismatches

SAMPLE_RATE = 16000
PARTIAL_FRAMES = 160  # 1.6 s windows of 10 ms frames
FRONTEND: dict[str, Any] = {
    "sample_rate": SAMPLE_RATE,
    "n_fft": 400,
    "hop": 160,
    "n_mels": 40,
    "window": "hann",
    "center": True,
    "pad_mode": "constant",
    "power": 2.0,
    "htk": False,
    "norm": "slaney",
    "log": None,  # the encoder reads the linear (power) mel spectrogram
    "volume_dbfs": -30.0,  # raised to this RMS when quieter
    "partial_frames": PARTIAL_FRAMES,
    # The model's input ('mel', (frames, 40)) from an example's 'audio' + 'sample_rate', for one
    # 1.6 s window (training); `embed_utterance` averages windows over a whole clip instead.
    "pp": (f"resample({SAMPLE_RATE})|normalize_volume(-30, increase_only=True)|"
           f"pad_or_crop(samples={(PARTIAL_FRAMES - 1) * 160})|"
           f"mel_spectrogram(sample_rate={SAMPLE_RATE}, n_fft=400, hop=160, n_mels=40)"),
}
_IGNORED = ("similarity_weight", "similarity_bias")  # GE2E loss scale and offset


def weights_file() -> Path:
    """resemblyzer/pretrained.pt of the installed package (found without importing it)."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("The GE2E weights come with the resemblyzer package: "
                                "pip install --no-deps resemblyzer==0.1.4")
    return Path(next(iter(spec.submodule_search_locations))) / "pretrained.pt"


def torch_name(name: str) -> tuple[str, bool]:
    """tljax parameter name -> (VoiceEncoder state-dict name, whether it is transposed)."""
    parts = name.split("/")
    if parts[0] == "linear":
        return f"linear.{'weight' if parts[1] == 'kernel' else 'bias'}", parts[1] == "kernel"
    layer, gate, leaf = parts  # lstm_{l}/{ih,hh}/{kernel,bias}
    index = layer[len("lstm_"):]
    kind = "weight" if leaf == "kernel" else "bias"
    return f"lstm.{kind}_{gate}_l{index}", leaf == "kernel"


def _model_kwargs(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Architecture read off the tensors' shapes."""
    try:
        num_layers = 1 + max(int(k.rsplit("_l", 1)[1]) for k in state
                             if k.startswith("lstm.weight_ih_l"))
        four_h, n_mels = np.shape(state["lstm.weight_ih_l0"])
        embedding_size = np.shape(state["linear.weight"])[0]
    except (KeyError, ValueError) as e:
        raise CheckpointMismatchError(
            f"Not a GE2E (VoiceEncoder) state dict: needs lstm.weight_ih_l0 and linear.weight "
            f"({type(e).__name__}: {e}); got {sorted(state)[:8]}...") from None
    return {"n_mels": int(n_mels), "hidden_size": int(four_h) // 4,
            "embedding_size": int(embedding_size), "num_layers": num_layers}


def convert(state: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, Any]]:
    """VoiceEncoder state dict -> ({'params': tree}, GE2E kwargs); strict (see module doc)."""
    kwargs = _model_kwargs(state)
    model = ge2e_lib.make(**kwargs)
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, 2, kwargs["n_mels"])))["params"]
    flat, problems, used = {}, [], set(_IGNORED)
    for name, shape in tree.flatten(shapes).items():
        key, transpose = torch_name(name)
        want = tuple(shape.shape[::-1] if transpose else shape.shape)
        if key not in state:
            problems.append((key, "missing in checkpoint", "-", str(want)))
            continue
        used.add(key)
        value = np.asarray(state[key], np.float32)
        if value.shape != want:
            problems.append((key, "shape mismatch", str(value.shape), str(want)))
            continue
        flat[name] = np.ascontiguousarray(value.T if transpose else value)
    problems += [(k, "unexpected (not in model)", str(np.shape(v)), "-")
                 for k, v in state.items() if k not in used]
    if problems:
        raise CheckpointMismatchError(
            f"The GE2E checkpoint does not match the model in {len(problems)} place(s):\n"
            + format_mismatches(sorted(problems)))
    return {"params": tree.unflatten(flat)}, kwargs


def load_ge2e(path: str | os.PathLike | None = None, num_classes: int | None = None,
              dtype: Any = None) -> tuple[Any, dict[str, Any], PretrainedInfo]:
    """(model, variables, info) of resemblyzer's encoder (or a VoiceEncoder file at `path`).

    `model.apply(variables, mel)` -> embedding (B, 256) for mel (B, frames, 40) from
    `mel_frames` (with `num_classes`, the logits of a zero-initialised head on it);
    `info.sample_rate` and `info.audio_frontend` describe the input.
    """
    from tljax.pretrained.api import model_of

    path = Path(path) if path is not None else weights_file()
    variables, kwargs = convert(readers.read_torch(path))
    if dtype is not None:
        kwargs["dtype"] = dtype
    info = PretrainedInfo(source=str(path), model_name="ge2e", model_kwargs=dict(kwargs),
                          num_classes=num_classes, sample_rate=SAMPLE_RATE,
                          audio_frontend=dict(FRONTEND))
    if num_classes:
        width = int(kwargs.get("embedding_size", 256))
        variables["params"]["head"] = {"kernel": np.zeros((width, num_classes), np.float32),
                                       "bias": np.zeros((num_classes,), np.float32)}
    return model_of(info), variables, info


# ---------------------------------------------------------------------------------------------
# Front end and utterance embeddings (resemblyzer's, without its voice-activity trimming).


def preprocess_wav(wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """float32 mono at `sample_rate` -> 16 kHz, RMS raised to -30 dBFS (no VAD trimming)."""
    wav = audio.resample(np.asarray(wav, np.float32), sample_rate, SAMPLE_RATE)
    return audio.normalize_volume(wav, FRONTEND["volume_dbfs"], increase_only=True)


def mel_frames(wav: np.ndarray) -> np.ndarray:
    """(frames, 40) float32 power mel spectrogram of 16 kHz audio: resemblyzer's
    `wav_to_mel_spectrogram`."""
    return audio.mel_spectrogram(wav, SAMPLE_RATE, FRONTEND["n_fft"], FRONTEND["hop"],
                                 FRONTEND["n_mels"], pad_mode=FRONTEND["pad_mode"])


def partial_slices(n_samples: int, rate: float = 1.3, min_coverage: float = 0.75
                   ) -> tuple[list[slice], list[slice]]:
    """Waveform and mel-frame slices of the 1.6 s windows covering an utterance (see the
    module docstring); resemblyzer's `compute_partial_slices`."""
    if not 0 < min_coverage <= 1:
        raise ValueError(f"min_coverage={min_coverage}: must be in (0, 1].")
    hop = FRONTEND["hop"]
    n_frames = math.ceil((n_samples + 1) / hop)
    frame_step = round(SAMPLE_RATE / rate / hop)
    if not 0 < frame_step <= PARTIAL_FRAMES:
        raise ValueError(f"rate={rate}: windows must overlap or touch; use a rate of at least "
                         f"{SAMPLE_RATE / (hop * PARTIAL_FRAMES):.3f} per second.")
    steps = max(1, n_frames - PARTIAL_FRAMES + frame_step + 1)
    mel_slices = [slice(i, i + PARTIAL_FRAMES) for i in range(0, steps, frame_step)]
    wav_slices = [slice(s.start * hop, s.stop * hop) for s in mel_slices]
    last = wav_slices[-1]
    coverage = (n_samples - last.start) / (last.stop - last.start)
    if coverage < min_coverage and len(mel_slices) > 1:
        mel_slices, wav_slices = mel_slices[:-1], wav_slices[:-1]
    return wav_slices, mel_slices


@functools.lru_cache(maxsize=8)
def _jit_apply(model: ge2e_lib.GE2E):
    """The embeddings (the features, not a head's logits) compiled once per number of windows
    (an eager scan re-traces every call)."""
    return jax.jit(lambda variables, mel: model.apply(variables, mel, head=False))


def embed_utterance(model: ge2e_lib.GE2E, variables: Mapping[str, Any], wav: np.ndarray,
                    sample_rate: int = SAMPLE_RATE, rate: float = 1.3,
                    min_coverage: float = 0.75, preprocess: bool = True) -> np.ndarray:
    """The (256,) embedding of one utterance: mean of its windows' embeddings, L2-normalised.

    `preprocess=True` resamples to 16 kHz and normalises the volume (`preprocess_wav`);
    pass False for audio that is already at 16 kHz and levelled.
    """
    wav = preprocess_wav(wav, sample_rate) if preprocess else np.asarray(wav, np.float32)
    wav_slices, mel_slices = partial_slices(wav.size, rate, min_coverage)
    if wav_slices[-1].stop >= wav.size:
        wav = np.pad(wav, (0, wav_slices[-1].stop - wav.size))
    mel = mel_frames(wav)
    windows = np.stack([mel[s] for s in mel_slices])
    partials = _jit_apply(model)(variables, windows)
    mean = np.asarray(partials, np.float64).mean(axis=0)
    return (mean / np.linalg.norm(mean)).astype(np.float32)
