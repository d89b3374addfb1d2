"""Every sweep in experiments/ loads, and every arm's config passes the run's checks."""

from __future__ import annotations

import glob
import os

import pytest

from tljax import sweep, validate
from tljax.errors import MissingFileError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Sweep files (experiments/*.py defining ARMS); vtab needs TFDS names only known online.
SWEEPS = sorted(p for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
                if "ARMS =" in open(p).read() and not p.endswith("vtab.py"))


def test_the_research_sweeps_are_all_here():
    names = {os.path.basename(p)[:-3] for p in SWEEPS}
    assert {"freeze_lite0", "freeze_minilm", "shift_source", "surgical", "regularisation",
            "stochastic_depth"} <= names


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: os.path.basename(p))
def test_every_arm_passes_the_checks(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # config paths are relative to the repository
    loaded = sweep.load_sweep(path)
    assert loaded.arms and loaded.seeds
    for run in loaded.runs()[:len(loaded.arms)]:
        overrides = dict(run.overrides)
        config = sweep.load_config(overrides.pop("config", loaded.config), overrides)
        try:
            validate.check_config(config)
        except MissingFileError as e:  # a model trained by another sweep, not run here
            assert "init.path" in str(e) and "runs/" in config.init.path, e
