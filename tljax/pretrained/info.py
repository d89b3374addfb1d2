"""What a converted checkpoint needs besides its weights."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class PretrainedInfo:
    """How to rebuild and feed a converted model.

    `model_name` and `model_kwargs` rebuild the backbone
    (`tljax.models.build(model_name, model_kwargs)`); `num_classes` is the size of the
    checkpoint's `head` (None: it has none), `task` what that head predicts, `head_input`
    what it reads (None: the pooled features; 'tokens': every token; a language model's LM
    head ('features', 'embedding')), `class_names` its
    labels when the checkpoint names them. The remaining fields describe the input the
    weights expect.
    """

    source: str
    model_name: str
    model_kwargs: dict[str, Any]
    num_classes: int | None = None
    task: str = "classification"
    head_input: str | tuple[str, ...] | None = None
    class_names: list[str] | None = None
    resolution: int | None = None
    value_range: tuple[float, float] | None = None  # pixels 0..255 mapped linearly to this range
    mean: tuple[float, ...] | None = None  # per-channel normalisation of 0..1 pixels
    std: tuple[float, ...] | None = None
    tokenizer_path: str | None = None
    max_length: int | None = None
    sample_rate: int | None = None  # audio models: the waveform rate (Hz) the front end expects
    # Audio models: the front end that turns waveforms into the model's input (mel settings and
    # a pp string producing it; see e.g. tljax.pretrained.ge2e.FRONTEND).
    audio_frontend: dict[str, Any] | None = None
