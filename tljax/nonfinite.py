"""Divergence: a NaN or infinite loss or gradient, detected inside the train step.

The step computes `finite = isfinite(loss) & isfinite(global gradient norm)` and, where it
is False, returns the state it was given (only the step counter advances): a non-finite
update never reaches the parameters, the optimizer state or the batch statistics (a
`lax.cond` in `tljax.train.make_train_step`). On the host, `Losses` collects each step's
loss and flag without waiting for them; they are read at log steps and before every
checkpoint save, and then

  on_nonfinite='stop'  (default) raises NonFiniteError naming the first bad step: the run
                       ends (exit status 3) before saving anything after it, so every
                       checkpoint kept is finite and none is rotated out by a diverged state;
  on_nonfinite='skip'  counts the skipped updates (`skipped_updates` in the log) and goes on.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from tljax.errors import NonFiniteError


class Losses:
    """The training losses of the current log window, and the non-finite policy."""

    def __init__(self, on_nonfinite: str, checkpoints: Any = None):
        self._stop = on_nonfinite == "stop"
        self._checkpoints = checkpoints
        self._window: list[tuple[int, Any, Any, Any]] = []  # (step, loss, grad_norm, finite)
        self._checked = 0  # entries of the window already checked
        self.skipped = 0

    def add(self, step: int, metrics: dict) -> None:
        self._window.append((step, metrics["loss"], metrics["grad_norm"], metrics["finite"]))

    def check(self) -> None:
        """Reads the flags not read yet; under 'stop' raises at the first non-finite step."""
        fresh = self._window[self._checked:]
        flags = jax.device_get([finite for *_, finite in fresh])
        for (step, loss, grad_norm, _), finite in zip(fresh, flags, strict=True):
            if finite:
                continue
            if self._stop:
                raise NonFiniteError(self._message(step, loss, grad_norm))
            self.skipped += 1
        self._checked = len(self._window)

    def flush(self) -> dict[str, float]:
        """{'loss': mean finite loss of the window, 'skipped_updates' once any} for the log."""
        self.check()
        losses = np.asarray(jax.device_get([loss for _, loss, *_ in self._window]), np.float64)
        finite = losses[np.isfinite(losses)]
        self._window, self._checked = [], 0
        record = {"loss": float(finite.mean()) if finite.size else float("nan")}
        return {**record, "skipped_updates": self.skipped} if self.skipped else record

    def _message(self, step: int, loss: Any, grad_norm: Any) -> str:
        latest = self._checkpoints.latest_step() if self._checkpoints is not None else None
        kept = (f"checkpoint {latest} (finite) is kept" if latest is not None
                else "no checkpoint was saved before it")
        return (f"The loss became non-finite at step {step} (loss {float(loss):.4g}, gradient "
                f"norm {float(grad_norm):.4g}); the run stopped and {kept}. Lower config.lr, "
                "set config.grad_clip_norm, or set config.on_nonfinite='skip' to skip such "
                "updates; rerunning resumes from the last checkpoint.")
