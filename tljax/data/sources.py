"""Random-access sources of decoded examples, what they hold (`DatasetInfo`), and splits.

A dataset name is either a registered name (``bbc_news``, ``wnut16``), ``prefix:argument``
for a registered prefix (``folder:/root``, ``textfile:/a.csv,/b.csv``, ``conll:/a.txt,/b.txt``)
or, failing both, a TFDS catalog name (``fashion_mnist``, ``cifar10``, ``name/config``,
``name:1.2.0``) read from ``data_dir`` in array_record format through ``tfds`` data sources
(no TensorFlow). Sources register with ``register_source`` in the module that reads them
(tljax/data/text.py, tljax/data/folders.py, tljax/data/audio.py: ``audiofolder:/root`` and
the synthesized speech sets ``spoken_keywords``, ``spoken_speakers``, ``spoken_languages``;
tljax/data/dense.py: ``coco:``, ``segfolder:``, ``fashion_scenes``; tljax/data/medical.py:
``decathlon:``);
each returns ``(source, info)`` for a split.

`DatasetInfo.features` describes each feature of an example by kind ('image', 'text',
'tokens' (a list of words), 'class_label', 'sequence_label' (one tag per word), ...) and, for
labels, the class names, so tasks read their label sets from the data.

Split strings take TFDS-style slices: ``train[:98%]``, ``train[98%:]``, ``train[:1000]``,
``train[10:-10]``; percent boundaries are rounded to the nearest example; ``+`` joins
splits (``train[:800]+validation[:200]``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tljax.errors import InputError

_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


class _NoOpenCvAdvice(logging.Filter):
    """TFDS advises installing OpenCV when it first decodes an image with PIL; PIL is what
    this pipeline uses (and measured), so the advice is noise on every run's console."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "OpenCV is not installed" not in str(record.msg)


logging.getLogger("absl").addFilter(_NoOpenCvAdvice())
_SPLIT_RE = re.compile(r"^\s*([\w-]+)\s*(?:\[(.*)\])?\s*$")


class DatasetNotPreparedError(InputError):
    """The dataset is not in data_dir; the message holds the command that prepares it."""


class BadExampleError(InputError):
    """One example cannot be read or decoded (a corrupt or truncated file); the message says
    why, and the input pipeline adds which example it is (`config.input.on_bad_example`)."""


@dataclasses.dataclass(frozen=True)
class Feature:
    """One feature of an example: its kind and, for labels, the class names."""

    kind: str  # 'image', 'text', 'tokens', 'class_label', 'sequence_label', 'audio', ...
    names: tuple[str, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **({"names": list(self.names)} if self.names else {})}


LABEL_KINDS = ("class_label", "sequence_label")


@dataclasses.dataclass
class DatasetInfo:
    name: str
    features: dict[str, Feature]
    # Sizes of the full splits, plus the requested (sliced) split under its own spelling.
    split_sizes: dict[str, int]

    def class_names(self, key: str = "label") -> list[str]:
        """The class (or tag) names of label feature `key`."""
        feature = self.features.get(key)
        if feature is None or feature.names is None:
            labels = [k for k, f in self.features.items() if f.kind in LABEL_KINDS]
            raise InputError(f"Dataset {self.name!r} has no label feature {key!r}"
                             f"{closest_hint(key, labels)}; its features: "
                             f"{', '.join(f'{k} ({f.kind})' for k, f in self.features.items())}.")
        return list(feature.names)

    def features_json(self) -> dict[str, Any]:
        return {k: f.to_json() for k, f in self.features.items()}


def closest_hint(name: str, valid: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def classification_features(input_kind: str, class_names: Sequence[str],
                            input_key: str | None = None) -> dict[str, Feature]:
    """{input: Feature(kind), 'label': class_label}: the features of a classification set."""
    return {input_key or input_kind: Feature(input_kind),
            "label": Feature("class_label", tuple(class_names))}


def resolve_data_dir(data_dir: str | None) -> str:
    if data_dir:
        return os.path.expanduser(str(data_dir))
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


# ---------------------------------------------------------------------------------------------
# Splits.


def parse_split(split: str) -> tuple[str, str | None]:
    """'train[:98%]' -> ('train', ':98%'); 'test' -> ('test', None)."""
    match = _SPLIT_RE.match(split)
    if not match:
        raise InputError(
            f"Bad split {split!r}: expected a name with an optional slice, e.g. 'train', "
            "'train[:98%]', 'train[98%:]', 'train[:1000]'."
        )
    return match.group(1), match.group(2)


def _boundary(text: str, n: int, split: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    try:
        if text.endswith("%"):
            return math.floor(float(text[:-1]) * n / 100 + 0.5)
        return int(text)
    except ValueError:
        raise InputError(f"Bad slice boundary {text!r} in split {split!r}: use an integer or "
                         "a percentage, e.g. 'train[:90%]' or 'train[:1000]'.") from None


def slice_indices(spec: str | None, n: int, split: str = "") -> range:
    """The example indices a slice spec selects from a split of n examples."""
    if spec is None:
        return range(n)
    if spec.count(":") != 1:
        raise InputError(f"Bad split slice {split!r}: use [start:stop], e.g. [:98%] or [:1000].")
    start, stop = (_boundary(part, n, split) for part in spec.split(":"))
    return range(n)[slice(start, stop)]


class IndexedSource(Sequence):
    """A view of `base` at `indices` (split slices)."""

    def __init__(self, base: Sequence, indices: range):
        self._base, self._indices = base, indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> Any:
        return self._base[self._indices[i]]

    def __getitems__(self, indices: Sequence[int]) -> list:
        mapped = [self._indices[i] for i in indices]
        if hasattr(self._base, "__getitems__"):
            return list(self._base.__getitems__(mapped))
        return [self._base[i] for i in mapped]

    def describe(self, i: int) -> str | None:
        describe = getattr(self._base, "describe", None)
        return describe(self._indices[i]) if describe else None


class ConcatSource(Sequence):
    """Several sources one after the other (a split spelt 'train[:800]+validation[:200]')."""

    def __init__(self, parts: list[Sequence]):
        self._parts = parts
        self._starts = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> Any:
        part = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._parts[part][i - int(self._starts[part])]

    def __getitems__(self, indices: Sequence[int]) -> list:
        return [self[i] for i in indices]

    def describe(self, i: int) -> str | None:
        part = int(np.searchsorted(self._starts, i, side="right")) - 1
        describe = getattr(self._parts[part], "describe", None)
        return describe(i - int(self._starts[part])) if describe else None


def select_split(
    name: str, splits: dict[str, Sequence], split: str, make_info
) -> tuple[Sequence, DatasetInfo]:
    """The examples of `split` (slices allowed; '+' joins several) and the dataset's info."""
    parts = []
    for one in split.split("+"):
        base, spec = parse_split(one)
        if base not in splits:
            raise InputError(
                f"Dataset {name!r} has no split {base!r}{closest_hint(base, list(splits))}; "
                f"available: {', '.join(sorted(splits))}."
            )
        indices = slice_indices(spec, len(splits[base]), one)
        if not indices:
            raise InputError(f"Split {one!r} of {name!r} selects no examples (the split has "
                             f"{len(splits[base])}).")
        parts.append(splits[base] if spec is None else IndexedSource(splits[base], indices))
    sizes = {k: len(v) for k, v in splits.items()}
    source = parts[0] if len(parts) == 1 else ConcatSource(parts)
    sizes[split] = len(source)
    return source, make_info(sizes)


# ---------------------------------------------------------------------------------------------
# TFDS (array_record).


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(x) for x in path.name.split("."))


def _has_array_record(version_dir: Path) -> bool:
    return (version_dir / "dataset_info.json").exists() and any(
        ".array_record" in p.name for p in version_dir.iterdir()
    )


def _dataset_dir(name: str, data_dir: str) -> tuple[Path, str | None]:
    """data_dir/name[/config] and the requested version (None = newest)."""
    name, _, version = name.partition(":")
    return Path(data_dir, *name.split("/")), version or None


def find_prepared(name: str, data_dir: str) -> Path | None:
    """The version directory of a dataset prepared in array_record format, or None.

    Only looks at the file system: TFDS itself would try the network for minutes.
    """
    root, version = _dataset_dir(name, data_dir)
    if not root.is_dir():
        return None
    versions = sorted(
        (p for p in root.iterdir() if p.is_dir() and _VERSION_RE.match(p.name)), key=_version_key
    )
    if not versions:
        # A dataset with configs given without one: accept it when a single config is prepared.
        configs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if len(configs) == 1:
            return find_prepared(f"{name}/{configs[0].name}", data_dir)
        return None
    if version is not None:
        versions = [v for v in versions if v.name == version]
    prepared = [v for v in versions if _has_array_record(v)]
    return prepared[-1] if prepared else None


def prepare_command(name: str, data_dir: str) -> str:
    return f"python tools/prepare_data.py {name} --data_dir={data_dir}"


def _unknown_dataset(name: str, data_dir: str) -> InputError | None:
    """An error for a name that is neither registered nor in the TFDS catalog, else None."""
    import tensorflow_datasets as tfds

    base = name.partition(":")[0].split("/")[0]
    catalog = tfds.list_builders(with_community_datasets=False)
    if base in catalog:
        return None
    registered = registered_names()
    prepared = sorted(p.name for p in Path(data_dir).iterdir() if p.is_dir()
                      and not p.name.startswith(".")) if Path(data_dir).is_dir() else []
    hint = closest_hint(name, [*registered, *prepared]) or closest_hint(base, catalog)
    return InputError(
        f"Unknown dataset {name!r}{hint}: expected a TFDS catalog name (prepared with "
        f"tools/prepare_data.py), one of {', '.join(registered)}.")


def _not_prepared(name: str, data_dir: str) -> InputError:
    unknown = _unknown_dataset(name, data_dir)
    if unknown is not None:
        return unknown
    root, _ = _dataset_dir(name, data_dir)
    other = ""
    if root.is_dir() and any(root.rglob("*.tfrecord*")):
        other = " (it is there in tfrecord format only; this pipeline reads array_record)"
    return DatasetNotPreparedError(
        f"Dataset {name!r} is not prepared in {data_dir}{other}. Prepare it with: "
        f"{prepare_command(name, data_dir)}"
    )


@functools.lru_cache(maxsize=16)
def _tfds_builder(version_dir: str):
    import tensorflow_datasets as tfds

    return tfds.builder_from_directory(version_dir)


def _tfds_feature(feature: Any) -> Feature:
    """A TFDS feature connector as a `Feature` (kind from its type, names from ClassLabels)."""
    import tensorflow_datasets as tfds

    f = tfds.features
    if isinstance(feature, f.ClassLabel):
        return Feature("class_label", tuple(feature.names))
    if isinstance(feature, f.Image):
        return Feature("image")
    if isinstance(feature, f.Text):
        return Feature("text")
    if isinstance(feature, f.Audio):
        return Feature("audio")
    if isinstance(feature, f.Sequence):
        inner = _tfds_feature(feature.feature)
        if inner.kind == "class_label":
            return Feature("sequence_label", inner.names)
        if inner.kind == "text":
            return Feature("tokens")
    return Feature(type(feature).__name__.lower())


def _tfds_source(name: str, split: str, data_dir: str) -> tuple[Sequence, DatasetInfo]:
    version_dir = find_prepared(name, data_dir)
    if version_dir is None:
        raise _not_prepared(name, data_dir)
    builder = _tfds_builder(str(version_dir))
    features = {(k if k != TEXT_ALIAS else "text"): _tfds_feature(v)
                for k, v in builder.info.features.items()}
    from tljax.data.dense import tfds_dense_features

    features.update(tfds_dense_features(builder.info.features))
    if _audio_rate(builder.info.features) is not None:
        features["sample_rate"] = Feature("int")
    splits = {s: _tfds_split(str(version_dir), s) for s in builder.info.splits}
    source, info = select_split(name, splits, split,
                                 lambda sizes: DatasetInfo(name, features, sizes))
    for one in split.split("+"):
        splits[parse_split(one)[0]].open()  # Read errors here, not in a prefetch thread.
    return source, info


# GLUE's single-sentence tasks (glue/sst2, glue/cola) call their text 'sentence'.
TEXT_ALIAS = "sentence"


def _audio_rate(features: Any) -> int | None:
    """The sample rate of a TFDS dataset's 'audio' feature (None: no audio, or no rate).

    TFDS audio (speech_commands, spoken_digit, ...) is integer PCM at the rate its feature
    declares; examples carry it as 'sample_rate', as audio folders do, so the audio pp ops
    (which scale integer PCM to [-1, 1)) read both alike.
    """
    import tensorflow_datasets as tfds

    feature = features["audio"] if "audio" in features else None
    if isinstance(feature, tfds.features.Audio) and feature.sample_rate:
        return int(feature.sample_rate)
    return None


def _as_text(example: dict[str, Any]) -> dict[str, Any]:
    if TEXT_ALIAS in example and "text" not in example:
        example = {**example, "text": example[TEXT_ALIAS]}
        del example[TEXT_ALIAS]
    return example


class _LazySplit(Sequence):
    """A TFDS split whose ArrayRecord files are opened on first access."""

    def __init__(self, builder, split: str, num_examples: int):
        self._builder, self._split, self._n = builder, split, num_examples
        self._source = None
        self._rename = TEXT_ALIAS in builder.info.features
        self._sample_rate = _audio_rate(builder.info.features)

    def open(self) -> Sequence:
        if self._source is None:
            self._source = self._builder.as_data_source(split=self._split)
        return self._source

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        examples = list(self.open().__getitems__(indices))
        if self._sample_rate is not None:
            examples = [{**e, "sample_rate": self._sample_rate} for e in examples]
        return [_as_text(e) for e in examples] if self._rename else examples


class _DecodedCache(Sequence):
    """Keeps every example decoded in memory once read, for small fixed-shape image datasets.

    Decoding PNGs is most of the cost of reading (e.g. Fashion-MNIST); with the cache only the
    first epoch pays it. Examples are read-only views into the cache.
    """

    def __init__(self, base: _LazySplit, shape: tuple[int, ...]):
        self._base = base
        self._images = np.empty((len(base), *shape), np.uint8)  # Pages are touched when filled.
        self._labels = np.empty(len(base), np.int64)
        self._filled = np.zeros(len(base), bool)
        self._view = self._images.view()
        self._view.flags.writeable = False

    def open(self) -> Sequence:
        return self._base.open()

    def __len__(self) -> int:
        return len(self._base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        indices = np.asarray(indices, np.int64)
        missing = indices[~self._filled[indices]]
        if missing.size:
            examples = self._base.__getitems__(missing.tolist())
            for i, example in zip(missing, examples, strict=True):
                self._images[i], self._labels[i] = example["image"], example["label"]
            self._filled[missing] = True  # Only after the rows are written (other threads read).
        return [{"image": self._view[i], "label": int(self._labels[i])} for i in indices]


def _cache_limit_bytes() -> int:
    return int(float(os.environ.get("TLJAX_DATA_CACHE_MB", 1024)) * 2**20)


@functools.lru_cache(maxsize=32)
def _tfds_split(version_dir: str, split: str) -> Sequence:
    """One shared reader per split and process, so the decoded cache outlives one iterator."""
    builder = _tfds_builder(version_dir)
    lazy = _LazySplit(builder, split, builder.info.splits[split].num_examples)
    features = builder.info.features
    if set(features) != {"image", "label"}:
        return lazy
    shape = features["image"].shape
    if None in shape or features["image"].np_dtype != np.uint8:
        return lazy
    if len(lazy) * math.prod(shape) > _cache_limit_bytes():
        return lazy
    return _DecodedCache(lazy, tuple(shape))


# ---------------------------------------------------------------------------------------------
# Registry.

SourceFn = Callable[[str, str, str | None], tuple[Sequence, DatasetInfo]]
_NAMED: dict[str, SourceFn] = {}
_PREFIXED: dict[str, SourceFn] = {}
# Modules whose sources register on import.
_SOURCE_MODULES = ("tljax.data.text", "tljax.data.folders", "tljax.data.audio",
                   "tljax.data.dense", "tljax.data.medical")


def register_source(name: str, *, prefix: bool = False) -> Callable[[SourceFn], SourceFn]:
    """Registers `fn(argument, split, data_dir) -> (source, info)` for dataset `name`.

    With prefix=True the dataset is spelt `name:argument` (e.g. `folder:/data/pets`);
    otherwise it is the bare name and `argument` is ''.
    """

    def decorator(fn: SourceFn) -> SourceFn:
        (_PREFIXED if prefix else _NAMED)[name] = fn
        return fn

    return decorator


def registered_names() -> list[str]:
    for module in _SOURCE_MODULES:
        importlib.import_module(module)
    return sorted(_NAMED) + [f"{p}:..." for p in sorted(_PREFIXED)]


def get_source(
    dataset: str, split: str, data_dir: str | None = None
) -> tuple[Sequence[dict], DatasetInfo]:
    """A random-access source of decoded examples of `split` (slices allowed), and its info."""
    registered_names()  # imports the registering modules
    prefix, sep, argument = dataset.partition(":")
    if sep and prefix in _PREFIXED:
        return _PREFIXED[prefix](argument, split, data_dir)
    if sep and "/" in argument:  # 'foldr:/data/x': a prefix that does not exist
        raise InputError(f"Unknown dataset prefix {prefix + ':'!r} in {dataset!r}"
                         f"{closest_hint(prefix, list(_PREFIXED))}; known prefixes: "
                         f"{', '.join(p + ':' for p in sorted(_PREFIXED))}.")
    if dataset in _NAMED:
        return _NAMED[dataset](argument, split, data_dir)
    return _tfds_source(dataset, split, resolve_data_dir(data_dir))
