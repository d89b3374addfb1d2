"""VTAB-1k: every task's config builds with 1,000 labels; the structured tasks' labels are
derived as VTAB defines them; '+' joins splits; compare_expected averages by group."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from tljax import data
from tljax.data import vtab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import compare_expected  # noqa: E402


def _config_module():
    spec = importlib.util.spec_from_file_location("vtab_config",
                                                  os.path.join(ROOT, "configs", "vtab.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nineteen_tasks_in_three_groups():
    groups = [t.group for t in vtab.TASKS.values()]
    assert len(vtab.TASKS) == 19
    assert (groups.count("natural"), groups.count("specialized"),
            groups.count("structured")) == (7, 4, 8)


@pytest.mark.parametrize("task", list(vtab.TASKS))
def test_every_task_config_uses_1000_labels(task):
    from tljax.data.sources import IndexedSource, select_split

    module = _config_module()
    final, val = module.get_config(f"task={task},method=lora"), module.get_config(
        f"task={task},method=linear_probe,val")
    assert final.expected.group == vtab.TASKS[task].group
    assert final.freeze.startswith("lora") and val.cache_features
    # The split strings select 1,000 (800 + 200) and 800 examples of large enough splits.
    big = {name: list(range(800_000)) for name in ("train", "validation", "test")}
    source, _ = select_split(task, big, final.input.split, lambda sizes: sizes)
    assert len(source) == 1000
    source, _ = select_split(task, big, val.input.split, lambda sizes: sizes)
    assert len(source) == 800 and isinstance(source, IndexedSource)
    source, _ = select_split(task, big, val.eval.split, lambda sizes: sizes)
    assert len(source) == 200


def test_structured_labels():
    clevr = {"image": np.zeros((4, 4, 3), np.uint8),
             "objects": {"size": np.zeros(5), "3d_coords": np.array(
                 [[0, 0, 9.2], [0, 0, 8.7], [0, 0, 12.0], [0, 0, 11], [0, 0, 10]])}}
    assert vtab.label_of("clevr_count", clevr) == 2  # 5 objects - 3
    assert vtab.label_of("clevr_distance", clevr) == 2  # closest 8.7: in [8.5, 9)
    kitti = {"objects": {"type": np.array([3, 0, 1]), "location": np.array(
        [[0, 0, 5.0], [0, 0, 25.0], [0, 0, 12.0]])}}
    assert vtab.label_of("kitti_distance", kitti) == 1  # nearest vehicle (van) at 12 m
    kitti["objects"]["type"] = np.array([3, 4, 5])
    assert vtab.label_of("kitti_distance", kitti) == 3  # no vehicle
    assert vtab.label_of("dsprites_location", {"label_x_position": 31}) == 15
    assert vtab.label_of("dsprites_orientation", {"label_orientation": 39}) == 15
    assert vtab.label_of("dsprites_orientation", {"label_orientation": 2}) == 0
    op = data.Preprocess("vtab_label('clevr_count')")
    out = op.example({**clevr, "mask": True}, None)
    assert sorted(out) == ["image", "label", "mask"] and out["label"] == 2
    with pytest.raises(ValueError, match="closest valid key: clevr_count"):
        data.Preprocess("vtab_label('clevr_cout')")


def test_plus_joins_splits():
    from tljax.data.sources import select_split

    splits = {"train": list(range(10)), "validation": list(range(100, 105))}
    source, sizes = select_split("d", splits, "train[:3]+validation[1:3]", lambda s: s)
    assert [source[i] for i in range(len(source))] == [0, 1, 2, 101, 102]
    assert source.__getitems__([4, 0]) == [102, 0] and sizes["train[:3]+validation[1:3]"] == 5


def test_compare_expected(tmp_path):
    def run(name, group, accuracy, published=(60.0, 55.0), value=None):
        workdir = tmp_path / name
        workdir.mkdir()
        expected = {"metric": "accuracy", "source": "bench, method m", "value": value,
                    "tolerance": 0.5 if value else None}
        if group:
            expected.update(group=group, published=list(published))
        (workdir / "config.json").write_text(json.dumps({"expected": expected}))
        (workdir / "results.json").write_text(json.dumps({"final_eval": {"accuracy": accuracy},
                                                          "main_metric": "accuracy"}))

    run("a", "natural", 0.8)
    run("b", "natural", 0.6)
    run("c", "structured", 0.3)
    run("paper", None, 0.9890, value=98.95)
    table = compare_expected.compare([str(tmp_path)])
    # natural 70.0, structured 30.0: mean of groups 50.0, mean of tasks 56.7.
    assert "| bench, method m | 70.0 | 30.0 | 50.0 | 56.7 | 60.0 / 55.0 | 3 |" in table
    assert f"| {tmp_path / 'paper'} | accuracy | 98.90 | 98.95 +- 0.5 | yes |" in table
    assert compare_expected.main([str(tmp_path / "nothing")]) == 2
