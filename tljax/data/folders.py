"""Class-folder datasets: `folder:/root` reads images in `root/<split>/<class>/*.png|jpg|jpeg`.

Every directory under `root` is a split (`train`, `test`, optionally `val`); class names are the
sorted union of the class folders of all splits, so a class's id is the same in every split.
Examples are {'image': uint8 HWC, 'label': int}; images are decoded on access (PIL).

Checked when the folder is opened, in one line naming the folder: a class folder holding no
file of the expected types, and (when there is a `train` split) a class with examples in
another split but none in train, which no run could learn. An image that cannot be decoded
(corrupt, truncated) raises `BadExampleError` naming its file when it is read; the pipeline
then stops or skips it (`config.input.on_bad_example`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tljax.data.sources import (
    BadExampleError,
    DatasetInfo,
    classification_features,
    register_source,
    select_split,
)
from tljax.errors import InputError, MissingFileError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class FileSource(Sequence):
    """Files read on access by `read(path)` into feature `key`, labelled by their class folder."""

    def __init__(self, files: list[Path], labels: list[int], key: str,
                 read: Callable[[Path], Any]):
        self._files, self._labels = files, np.asarray(labels, np.int64)
        self._key, self._read = key, read

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            value = self._read(self._files[i])
        except BadExampleError:
            raise
        except (OSError, ValueError, SyntaxError) as e:  # PIL: unreadable or truncated
            raise BadExampleError(f"cannot read {self._files[i]} ({e})") from e
        return {self._key: value, "label": self._labels[i]}

    def describe(self, i: int) -> str:
        return str(self._files[i])


def class_folders(root: Path, extensions: Sequence[str], what: str = "image"
                  ) -> tuple[list[str], dict[str, tuple[list[Path], list[int]]]]:
    """(class names, {split: (files, labels)}) of `root/<split>/<class>/*<extension>`."""
    if not root.is_dir():
        raise MissingFileError(f"{what.capitalize()} folder {root} does not exist.")
    split_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_names = sorted(
        {c.name for s in split_dirs for c in s.iterdir() if c.is_dir() and c.name[0] != "."}
    )
    if not class_names:
        raise InputError(
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
            if class_dir.is_dir() and not found:
                kinds = sorted({p.suffix.lower() or p.name for p in class_dir.iterdir()})
                raise InputError(
                    f"Class folder {class_dir} holds no {what} ({'/'.join(extensions)})"
                    f"{'; it has ' + ', '.join(kinds[:5]) if kinds else ''}: add {what}s "
                    "or remove the folder.")
            files += found
            labels += [label] * len(found)
        splits[split_dir.name] = (files, labels)
    if "train" in splits:
        trained = set(splits["train"][1])
        for split_name, (_, labels) in splits.items():
            missing = sorted({class_names[i] for i in labels} - {class_names[i] for i in trained})
            if missing:
                raise InputError(
                    f"Classes {missing} of {root / split_name} have no {what} in "
                    f"{root / 'train'}: a run cannot learn them; add training {what}s or "
                    f"remove those folders from {split_name}.")
    return class_names, splits


def _read_image(path: Path) -> np.ndarray:
    from tljax.data.preprocess import decode_image

    return decode_image(path)


@register_source("folder", prefix=True)
def folder_source(root: str, split: str, data_dir: str | None = None
                  ) -> tuple[Sequence, DatasetInfo]:
    del data_dir
    class_names, found = class_folders(Path(root).expanduser().resolve(), IMAGE_EXTENSIONS)
    splits = {name: FileSource(files, labels, "image", _read_image)
              for name, (files, labels) in found.items()}
    name = f"folder:{root}"
    features = classification_features("image", class_names)
    return select_split(name, splits, split, lambda sizes: DatasetInfo(name, features, sizes))
