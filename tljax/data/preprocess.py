"""Preprocessing strings: ``'decode|resize(32)|rgb|value_range(-1, 1)|onehot(10)'``.

A string is a chain of ops separated by ``|``; each op is ``name`` or ``name(args)`` with Python
literal arguments (parsed with ``ast.literal_eval``, never evaluated).

The data contract. A source yields examples, dicts of features (``'image'`` as a numpy HWC
array, ``'text'`` as str, ``'label'`` as int, ``'tokens'`` as a list of words, ...). Example ops
map an example to an example and may add, change or remove any key: targets are made here
(``onehot``, ``copy``, ``keep``, ``drop``), in the style of big_vision. Collation stacks *every*
key that remains into a batch (``'image'`` as float32; integer arrays as int32; strings and
ragged lists as object arrays, which stay on the host). Batch ops then map the whole batch to a
batch: ``tokenize`` runs the Rust tokenizer once per batch, so batch ops come last. Images stay
uint8 until an op that produces floats (``value_range``, ``normalize``).

Random ops draw from a ``numpy.random.Generator`` that the pipeline derives from its seed and the
example's position in the stream, so augmentation is reproducible and independent of threading
and of how the stream is split across processes.

Ops register themselves with ``register``; modules of further ops (text, audio, ...) are listed
in ``_OP_MODULES`` and imported when a pp string is first parsed.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tljax.data.sources import BadExampleError
from tljax.errors import InputError

Example = dict[str, Any]
ExampleOp = Callable[[Example, np.random.Generator], Example]
Batch = dict[str, Any]
BatchOp = Callable[[Batch], Batch]


@dataclasses.dataclass(frozen=True)
class _Registered:
    factory: Callable[..., Any]
    random: bool
    batched: bool


_OPS: dict[str, _Registered] = {}
# Features an example keeps through the ops (anything else a source yields is dropped).


def register(name: str, *, random: bool = False, batched: bool = False):
    """Registers an op factory: called with the pp arguments, returns the op.

    Example ops take (example, rng) and return the new example; batched ops take one collated
    batch (a dict of arrays) and return the new batch. An op whose randomness depends on its
    arguments (`pad_or_crop(random=True)`) sets `op.is_random`, which overrides `random`; the
    rng of a non-random op is None.
    """

    def decorator(factory):
        _OPS[name] = _Registered(factory, random, batched)
        return factory

    return decorator


# Modules whose ops register on import (kept out of this file's import time).
_OP_MODULES = ("tljax.data.text", "tljax.data.lm_text", "tljax.data.audio",
               "tljax.data.corruptions", "tljax.data.vtab", "tljax.data.dense",
               "tljax.data.medical")


def _import_op_modules() -> None:
    for module in _OP_MODULES:
        importlib.import_module(module)


def available_ops() -> list[str]:
    _import_op_modules()
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
        raise InputError(
            f"Cannot parse preprocessing op {spec!r}: expected name or name(args) with Python "
            f"literal arguments, e.g. resize(32) or value_range(-1, 1) ({e})."
        ) from None
    return node.func.id, args, kwargs


def _lookup(name: str) -> _Registered:
    _import_op_modules()
    if name in _OPS:
        return _OPS[name]
    close = difflib.get_close_matches(name, _OPS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise InputError(
        f"Unknown preprocessing op {name!r}.{hint} Valid ops: {', '.join(available_ops())}."
    )


class Preprocess:
    """A parsed pp string: per-example ops, collation, then batch ops."""

    def __init__(self, pp: str):
        self.pp = pp
        self.example_ops: list[ExampleOp] = []
        self.batch_ops: list[BatchOp] = []
        self.is_random = False
        for spec in _split_top_level(pp):
            name, args, kwargs = _parse_op(spec)
            reg = _lookup(name)
            if self.batch_ops and not reg.batched:
                raise InputError(f"{name!r} follows a batch op in {pp!r}; batch ops such as "
                                 "tokenize must come last.")
            try:
                op = reg.factory(*args, **kwargs)
            except (TypeError, ValueError) as e:
                raise InputError(f"Bad arguments for preprocessing op {spec!r}: {e}") from None
            self.is_random |= bool(getattr(op, "is_random", reg.random))
            (self.batch_ops if reg.batched else self.example_ops).append(op)
        # Trailing pixel-wise image ops (value_range, normalize) run once on the stacked
        # batch in `batch`: uint8 images are stacked before they become 4x larger floats.
        tail = 0
        while tail < len(self.example_ops) and hasattr(self.example_ops[-1 - tail], "pointwise"):
            tail += 1
        self._per_example = self.example_ops[:len(self.example_ops) - tail]
        self._pointwise = [op.pointwise for op in self.example_ops[len(self.example_ops) - tail:]]

    def example(self, example: Example, rng: np.random.Generator) -> Example:
        """Applies the per-example ops to a copy of `example`."""
        out = dict(example)
        for op in self.example_ops:
            out = op(out, rng)
        return out

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Stacks preprocessed examples key by key (see `stack`), then runs the batch ops."""
        return self._batch_ops(self._stack(examples))

    def _batch_ops(self, batch: Batch) -> Batch:
        for op in self.batch_ops:
            batch = op(batch)
        return batch

    def _stack(self, examples: Sequence[Example]) -> Batch:
        keys = list(examples[0])
        for i, example in enumerate(examples[1:], 1):
            if list(example) != keys:
                raise InputError(f"Examples 0 and {i} of a batch have different keys "
                                 f"({sorted(keys)} vs {sorted(example)}); make every example "
                                 "produce the same keys (e.g. with keep(...)).")
        return {key: stack(key, [e[key] for e in examples]) for key in keys}

    def begin(self, example: Example, rng: np.random.Generator | None) -> Example:
        """The per-example ops of `example`, except trailing pixel-wise image ops, which
        `end` applies once to the stacked batch."""
        out = dict(example)
        for op in self._per_example:
            out = op(out, rng)
        return out

    def end(self, begun: Sequence[Example]) -> Batch:
        """The batch of examples that went through `begin`: `collate([example(e, rng) ...])`,
        bit for bit, with trailing pixel-wise image ops applied once to the stacked images
        (one pass over the batch instead of one float copy per example and another to stack
        them)."""
        if not self._pointwise:
            return self.collate(begun)
        images = [e.get("image") for e in begun]
        if not all(isinstance(x, np.ndarray) and x.shape == images[0].shape for x in images):
            # Missing or ragged images: finish per example (collate then says what is wrong).
            return self.collate([self._finish(e) for e in begun])
        stacked = np.stack(images)
        for fn in self._pointwise:
            stacked = fn(stacked)
        batch = self._stack([{**e, "image": 0} for e in begun])
        batch["image"] = stacked.astype(np.float32, copy=False)
        return self._batch_ops(batch)

    def batch(self, examples: Sequence[Example],
              rngs: Sequence[np.random.Generator | None]) -> Batch:
        """`end([begin(e, rng) ...])`: the preprocessed, collated batch of `examples`."""
        return self.end([self.begin(e, r) for e, r in zip(examples, rngs, strict=True)])

    def _finish(self, example: Example) -> Example:
        for fn in self._pointwise:
            example = {**example, "image": fn(example["image"])}
        return example

    def __call__(self, examples: Sequence[Example], rng: np.random.Generator) -> Batch:
        """Preprocesses and collates a list of examples (handy outside a pipeline)."""
        return self.collate([self.example(e, rng) for e in examples])


# Model inputs that must have one shape per batch, and how to give them one.
_SAME_SHAPE = {
    "image": "add resize(...) or central_crop(...) to pp, and rgb if some images are grayscale",
    "mel": "add pad_or_crop(seconds=...) before the mel op",
    "audio": "add pad_or_crop(seconds=...) to pp",
    "segmentation": "add resize_dense(...) to pp",
    "boxes": "add pad_boxes(max_boxes) to pp",
}


def stack(key: str, values: list[Any]) -> np.ndarray:
    """One batch array of a key: images float32, integers int32, floats and bools as they are,
    strings and ragged sequences as an object array (host-side only)."""
    first = values[0]
    if isinstance(first, (str, bytes)):
        return np.asarray(values, dtype=object)
    if isinstance(first, (list, tuple)) or (isinstance(first, np.ndarray) and first.ndim
                                             and len({np.shape(v) for v in values}) > 1):
        if key in _SAME_SHAPE:
            shapes = sorted({np.shape(v) for v in values})
            raise InputError(f"Cannot batch {key!r} arrays of different shapes {shapes}: "
                             f"{_SAME_SHAPE[key]}.")
        out = np.empty(len(values), dtype=object)
        out[:] = [np.asarray(v) if not isinstance(v, (list, tuple)) else v for v in values]
        return out
    array = np.asarray(values) if not isinstance(first, np.ndarray) else np.stack(values)
    if key == "image":
        return array.astype(np.float32, copy=False)  # np.stack made a fresh array already
    if array.dtype.kind in "iu" and array.dtype != np.int32:
        return array.astype(np.int32)
    if array.dtype == np.float64:
        return array.astype(np.float32)
    return array


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


def _pointwise(fn: Callable[[np.ndarray], np.ndarray]) -> ExampleOp:
    """An image op acting on each pixel alone (so on a stacked batch the same, bit for bit);
    `Preprocess.batch` applies trailing ones to the whole batch (see there)."""
    op = _on_image(fn)
    op.pointwise = fn  # type: ignore[attr-defined]
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


def _check_fits(image: np.ndarray, h: int, w: int, op: str,
                fix: str = "resize or resize_small") -> None:
    if image.shape[0] < h or image.shape[1] < w:
        raise ValueError(
            f"{op}({h}, {w}) on a {image.shape[0]}x{image.shape[1]} image: {fix} first."
        )


@register("decode")
def decode() -> ExampleOp:
    """Decodes encoded image bytes (PNG/JPEG) and text bytes; already-decoded data passes."""

    def op(example: Example, rng: np.random.Generator) -> Example:
        del rng
        out = dict(example)
        if isinstance(out.get("image"), bytes):
            try:
                out["image"] = decode_image(out["image"])
            except (OSError, ValueError, SyntaxError) as e:  # PIL: unreadable or truncated
                raise BadExampleError(f"cannot decode its image ({e})") from e
        if isinstance(out.get("text"), bytes):
            out["text"] = out["text"].decode("utf-8")
        return out

    return op


try:  # libjpeg-turbo straight into numpy: ~1.5x faster than PIL, same pixels (tested)
    import simplejpeg
except ImportError:  # pragma: no cover - optional; PIL decodes the same JPEGs identically
    simplejpeg = None

_JPEG_MAGIC = b"\xff\xd8"


def _decode_jpeg(data: bytes) -> np.ndarray | None:
    """A baseline/progressive gray or colour JPEG via simplejpeg; None for anything else (CMYK,
    or simplejpeg absent), which PIL then decodes. Same settings as PIL's (accurate integer
    IDCT, fancy upsampling), hence the same pixels."""
    if simplejpeg is None:
        return None
    try:
        _, _, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace == "Gray":
            return simplejpeg.decode_jpeg(data, colorspace="GRAY")
        if colorspace in ("YCbCr", "RGB"):
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError:
        pass
    return None


def decode_image(data: bytes | Path) -> np.ndarray:
    """PNG/JPEG -> uint8 HWC; grayscale stays one channel, everything else becomes RGB."""
    if isinstance(data, Path) and data.suffix.lower() in (".jpg", ".jpeg"):
        data = data.read_bytes()
    if isinstance(data, bytes) and data[:2] == _JPEG_MAGIC:
        array = _decode_jpeg(data)
        if array is not None:
            return array
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
        # (x - in_min) * scale + vmin in float32, in place on one copy: the same roundings as
        # the expression with temporaries, at a fraction of the memory traffic.
        out = image.astype(np.float32)
        out -= in_min
        out *= np.float32(scale)
        out += np.float32(vmin)
        return np.clip(out, vmin, vmax, out=out) if clip_values else out

    return _pointwise(fn)


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
        x -= mean_
        x *= inv_std
        return x

    return _pointwise(fn)


# ---------------------------------------------------------------------------------------------
# Keys and targets.


@register("keep")
def keep(*keys: str) -> ExampleOp:
    """Keeps only `keys` (and the pipeline's padding 'mask'): drop everything else."""
    wanted = set(keys) | {"mask"}

    def op(example: Example, rng: np.random.Generator) -> Example:
        del rng
        missing = set(keys) - set(example)
        if missing:
            raise ValueError(f"keep{keys}: the example has no {sorted(missing)} "
                             f"(it has {sorted(example)}).")
        return {k: v for k, v in example.items() if k in wanted}

    return op


@register("drop")
def drop(*keys: str) -> ExampleOp:
    """Removes `keys` from the example (absent keys are ignored)."""

    def op(example: Example, rng: np.random.Generator) -> Example:
        del rng
        return {k: v for k, v in example.items() if k not in keys}

    return op


@register("copy")
def copy(inkey: str, outkey: str) -> ExampleOp:
    """example[outkey] = example[inkey]."""

    def op(example: Example, rng: np.random.Generator) -> Example:
        del rng
        return {**example, outkey: example[inkey]}

    return op


@register("onehot")
def onehot(depth: int, key: str = "label", key_result: str | None = None, on: float = 1.0,
           off: float = 0.0) -> ExampleOp:
    """Integer class `key` -> float32 vector of `depth` (`on` at the class, `off` elsewhere).

    With smoothing, e.g. onehot(10, on=0.91, off=0.01) is label smoothing 0.1.
    """

    def op(example: Example, rng: np.random.Generator) -> Example:
        del rng
        label = int(example[key])
        if not 0 <= label < depth:
            raise ValueError(f"onehot({depth}): label {label} is outside [0, {depth}).")
        vector = np.full(depth, off, np.float32)
        vector[label] = on
        return {**example, key_result or key: vector}

    return op


@register("multihot")
def multihot(depth: int, key: str = "labels", key_result: str | None = None) -> ExampleOp:
    """A list of class ids (multi-label) -> float32 vector of `depth` with 1 at each id."""

    def op(example: Example, rng: np.random.Generator) -> Example:
        del rng
        ids = np.asarray(example[key], np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= depth):
            raise ValueError(f"multihot({depth}): class ids {ids.tolist()} outside [0, {depth}).")
        vector = np.zeros(depth, np.float32)
        vector[ids] = 1.0
        return {**example, key_result or key: vector}

    return op


@register("relabel")
def relabel(mapping: Sequence[int], key: str = "label") -> ExampleOp:
    """Integer class `key` c -> mapping[c]: an output-level shift (classes permuted or
    merged), e.g. relabel([1, 2, 3, 4, 5, 6, 7, 8, 9, 0]) moves every class to the next id."""
    table = [int(c) for c in mapping]

    def op(example: Example, rng: np.random.Generator) -> Example:
        del rng
        label = int(example[key])
        if not 0 <= label < len(table):
            raise ValueError(f"relabel: label {label} has no entry in the mapping of "
                             f"{len(table)} classes.")
        return {**example, key: table[label]}

    return op


# ---------------------------------------------------------------------------------------------
# RandAugment.


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _array(image: Image.Image, channels: int) -> np.ndarray:
    array = np.asarray(image)
    return array[..., None] if channels == 1 else array


def _randaugment_ops(magnitude: float) -> dict[str, Callable[[Image.Image, float], Image.Image]]:
    """The 14 RandAugment transformations at `magnitude` (0..10 scale); `sign` is +-1."""
    from PIL import ImageEnhance, ImageOps

    m = magnitude / 10

    def fill(image: Image.Image) -> int | tuple[int, ...]:
        return 128 if image.mode == "L" else (128, 128, 128)  # mid gray where pixels move in

    def affine(image: Image.Image, matrix: tuple) -> Image.Image:
        return image.transform(image.size, Image.AFFINE, matrix, Image.BILINEAR,
                               fillcolor=fill(image))

    return {
        "identity": lambda im, s: im,
        "autocontrast": lambda im, s: ImageOps.autocontrast(im),
        "equalize": lambda im, s: ImageOps.equalize(im),
        "rotate": lambda im, s: im.rotate(30 * m * s, Image.BILINEAR, fillcolor=fill(im)),
        "solarize": lambda im, s: ImageOps.solarize(im, int(256 - 256 * m)),
        "color": lambda im, s: ImageEnhance.Color(im).enhance(1 + 0.9 * m * s),
        "posterize": lambda im, s: ImageOps.posterize(im, max(1, int(8 - 4 * m))),
        "contrast": lambda im, s: ImageEnhance.Contrast(im).enhance(1 + 0.9 * m * s),
        "brightness": lambda im, s: ImageEnhance.Brightness(im).enhance(1 + 0.9 * m * s),
        "sharpness": lambda im, s: ImageEnhance.Sharpness(im).enhance(1 + 0.9 * m * s),
        "shear_x": lambda im, s: affine(im, (1, 0.3 * m * s, 0, 0, 1, 0)),
        "shear_y": lambda im, s: affine(im, (1, 0, 0, 0.3 * m * s, 1, 0)),
        "translate_x": lambda im, s: affine(im, (1, 0, 0.45 * m * s * im.size[0], 0, 1, 0)),
        "translate_y": lambda im, s: affine(im, (1, 0, 0, 0, 1, 0.45 * m * s * im.size[1])),
    }


@register("randaugment", random=True)
def randaugment(num_ops: int = 2, magnitude: float = 9) -> ExampleOp:
    """RandAugment (Cubuk et al. 2020): `num_ops` transformations drawn uniformly from 14
    (rotate, shear, translate, colour, contrast, solarize, ...) at `magnitude` 0..10, each in
    a random direction, on uint8 images (put it before value_range)."""
    ops = _randaugment_ops(magnitude)
    names = sorted(ops)

    def op(example: Example, rng: np.random.Generator) -> Example:
        image = example["image"]
        if image.dtype != np.uint8:
            raise ValueError("randaugment works on uint8 images: put it before value_range / "
                             "normalize in pp.")
        pil = _pil(image)
        for index in rng.integers(0, len(names), num_ops):
            pil = ops[names[index]](pil, 1.0 if rng.random() < 0.5 else -1.0)
        return {**example, "image": _array(pil, image.shape[-1])}

    return op
