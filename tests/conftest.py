"""Shared fixtures: prepared datasets reused by the data, training and evaluation tests."""

from __future__ import annotations

import pytest

from tljax.data import prepare, sources


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> str:
    """A data_dir holding fashion_mnist (array_record), prepared there once if missing.

    Uses the default data_dir ($TFDS_DATA_DIR, else ~/tensorflow_datasets) so that `make setup`,
    the tests and training runs share one copy. Building it from the Debian files takes ~45 s.
    """
    data_dir = sources.resolve_data_dir(None)
    if sources.find_prepared("fashion_mnist", data_dir) is None:
        local_files = prepare.fashion_mnist_files().values()
        have_local = all(path.exists() for pair in local_files for path in pair)
        prepare.prepare("fashion_mnist", data_dir, source="local" if have_local else "auto")
    return data_dir
