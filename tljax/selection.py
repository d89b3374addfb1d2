"""Best-checkpoint selection on the eval split, with early stopping.

    config.early_stopping = dict(metric="accuracy", patience=3)   # None: off (the default)

Every evaluation (each `eval_every_*` and the last step) is compared with the best so far
on `metric`, a key of the eval metrics: `accuracy`, `loss`, `ema/accuracy` (the weight
average, `config.ema_decay`) or `NAME/accuracy` (an extra evaluation,
`config.extra_evals`). `mode` is 'max', or 'min' (the default for names ending in `loss`);
an evaluation improves on the best when it beats it by more than `min_delta`. The run
keeps the best weights in WORKDIR/best/ (`tljax.checkpoint.save_variables`: params and
model state, the average's params for an `ema/` metric, with the step, its metrics and
the config; load them with `checkpoint.load_variables(WORKDIR/best)` or
`init.source='tljax'`), and stops after `patience` evaluations in a row without an
improvement (None: never; the run only selects). Its results.json then reports, as
`final_eval`, the metrics of the best evaluation, and under `selection` the metric, the
best step, the step it stopped at and every evaluation's value.

Select on a validation split, not on the test split (VTAB's 800/200, or `val` in
configs/vit_finetune.py); test metrics can ride along as an extra evaluation and are then
reported at the selected step.

Resuming: the record of evaluations is WORKDIR/selection.json. A run resumed from
checkpoint s forgets the evaluations after s (it makes them again: a resumed run computes
the same weights, so the same metrics) and a run that stopped early is finished.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from tljax.config import ConfigError
from tljax.workdir import write_json

FILE = "selection.json"
BEST = "best"
KEYS = ("metric", "patience", "mode", "min_delta")


def check(config: ml_collections.ConfigDict) -> None:
    """One-line errors for a malformed `early_stopping` (before any work)."""
    spec = config.get("early_stopping")
    if not spec:
        return
    spec = dict(spec)
    unknown = set(spec) - set(KEYS)
    if unknown:
        raise ConfigError(f"config.early_stopping has unknown keys {sorted(unknown)}; valid: "
                          f"{', '.join(KEYS)}.")
    metric = spec.get("metric")
    if not isinstance(metric, str) or not metric:
        raise ConfigError("config.early_stopping needs metric=NAME, a key of the eval metrics "
                          "(e.g. 'accuracy', 'loss', 'ema/accuracy').")
    if metric.startswith("ema/") and config.get("ema_decay") is None:
        raise ConfigError(f"config.early_stopping.metric={metric!r} selects on the weight "
                          "average, but config.ema_decay is None.")
    patience = spec.get("patience")
    if patience is not None and (not isinstance(patience, int) or isinstance(patience, bool)
                                 or patience < 1):
        raise ConfigError(f"config.early_stopping.patience={patience!r}: expected None or an "
                          "integer >= 1 (evaluations without improvement before stopping).")
    if spec.get("mode", "max") not in ("max", "min"):
        raise ConfigError(f"config.early_stopping.mode={spec['mode']!r}: expected 'max' or "
                          "'min'.")
    if not config.get("eval_every_steps") and not config.get("eval_every_epochs") \
            and not config.get("eval_every_examples"):
        raise ConfigError("config.early_stopping needs evaluations during the run: set "
                          "eval_every_steps (or _epochs, _examples).")


class Selection:
    """Follows the evaluations of one run; see the module docstring.

    `observe(step, metrics, state)` after each evaluation; `stopped` is the step the run
    stopped at (None while it goes on); `final_eval()` the metrics the run reports.
    Without `config.early_stopping` it only remembers the last evaluation.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, resume_step: int,
                 is_chief: bool = True):
        spec = dict(config.get("early_stopping") or {})
        self.enabled = bool(spec)
        self.metric = spec.get("metric")
        self.patience = spec.get("patience")
        default_mode = "min" if (self.metric or "").endswith("loss") else "max"
        self.mode = spec.get("mode", default_mode)
        self.min_delta = float(spec.get("min_delta", 0.0))
        self._config = config
        self._workdir = workdir
        self._is_chief = is_chief
        self.history: list[dict[str, Any]] = []  # {'step', 'value', 'metrics'} per evaluation
        self.stopped: int | None = None
        self._last: dict[str, float] | None = None
        if self.enabled:
            self._resume(resume_step)

    def _resume(self, resume_step: int) -> None:
        path = os.path.join(self._workdir, FILE)
        if not os.path.exists(path):
            return
        with open(path) as f:
            saved = json.load(f)
        self.history = [h for h in saved.get("history", []) if h["step"] <= resume_step]
        stopped = saved.get("stopped")
        self.stopped = stopped if stopped is not None and stopped <= resume_step else None
        if self.history:
            self._last = self.history[-1]["metrics"]

    def _better(self, value: float, best: float) -> bool:
        if self.mode == "max":
            return value > best + self.min_delta
        return value < best - self.min_delta

    @property
    def best(self) -> dict[str, Any] | None:
        """The first evaluation no later one beat (ties keep the earlier step)."""
        best = None
        for h in self.history:
            if best is None or self._better(h["value"], best["value"]):
                best = h
        return best

    def _since_best(self) -> int:
        best = self.best
        return sum(1 for h in self.history if h["step"] > best["step"]) if best else 0

    def observe(self, step: int, metrics: dict[str, float], state: dict) -> None:
        """Records an evaluation; saves the weights when they are the best; may stop."""
        self._last = dict(metrics)
        if not self.enabled:
            return
        if self.metric not in metrics:
            raise ConfigError(f"config.early_stopping.metric={self.metric!r} is not an eval "
                              f"metric; the evaluation gave {', '.join(sorted(metrics))}.")
        value = float(metrics[self.metric])
        previous = self.best
        self.history.append({"step": int(step), "value": value,
                             "metrics": {k: float(v) for k, v in metrics.items()}})
        if previous is None or self._better(value, previous["value"]):
            self._save_best(step, metrics, state)
        elif self.patience is not None and self._since_best() >= self.patience:
            self.stopped = int(step)
        if self._is_chief:
            write_json(os.path.join(self._workdir, FILE),
                       {"metric": self.metric, "mode": self.mode, "patience": self.patience,
                        "min_delta": self.min_delta, "stopped": self.stopped,
                        "best_step": self.best["step"], "history": self.history})

    def _save_best(self, step: int, metrics: dict[str, float], state: dict) -> None:
        from jax.experimental import multihost_utils

        from tljax import checkpoint

        params = state["ema"] if self.metric.startswith("ema/") else state["params"]
        variables = jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(
            {"params": params, **state["model_state"]}, tiled=True))
        checkpoint.save_variables(
            os.path.join(self._workdir, BEST), variables,
            {"step": int(step), "metrics": {k: float(v) for k, v in metrics.items()},
             "selected_on": self.metric,
             "config": json.loads(self._config.to_json_best_effort())})

    def final_eval(self) -> dict[str, float]:
        """The best evaluation's metrics when selecting, else the last evaluation's."""
        if self.enabled and self.best is not None:
            return dict(self.best["metrics"])
        return dict(self._last or {})

    def summary(self) -> dict[str, Any]:
        """What results.json records under `selection` (empty when not selecting)."""
        if not self.enabled:
            return {}
        best = self.best
        return {"selection": {
            "metric": self.metric, "mode": self.mode, "patience": self.patience,
            "best_step": best["step"] if best else None, "stopped_at": self.stopped,
            "best_dir": os.path.join(self._workdir, BEST),
            "evaluations": [[h["step"], h["value"]] for h in self.history]}}
