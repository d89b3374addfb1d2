"""What a person watches and keeps: console progress, metrics.jsonl, TensorBoard, plots."""

from __future__ import annotations

import json
import os
import time
from typing import Any


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class MetricWriter:
    """Appends one JSON object per log or eval step to WORKDIR/metrics.jsonl, mirrors
    scalars to TensorBoard event files and prints a progress line.

    A run resumed from step r first drops the records an interrupted run wrote after its
    checkpoint r (the resumed run writes them again), including a final evaluation written
    after the last checkpoint, so metrics.jsonl holds each record once, as an uninterrupted
    run writes it; TensorBoard purges its events after r likewise.
    Only the writer with `enabled=True` (process 0) touches files.
    """

    def __init__(self, workdir: str, total_steps: int, enabled: bool = True,
                 resume_step: int = 0):
        self.total_steps = total_steps
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tensorboard = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._drop_after(resume_step)
            self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                              purge_step=resume_step + 1 if resume_step
                                              else None)
        self._clock: tuple[float, int] | None = None  # (time, step) the rate is measured from

    def _drop_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        records = read_metrics(os.path.dirname(self.path), strict=False)
        kept = [r for r in records if r["step"] < step or (r["step"] == step and not (
            r["kind"] == "eval" and step == self.total_steps))]
        if len(kept) == len(lines):
            return
        from tljax.workdir import write_json

        write_json(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def start_clock(self, step: int) -> None:
        """Rates and ETA count from here (after the first step compiled)."""
        self._clock = (time.perf_counter(), step)

    def write(self, step: int, metrics: dict[str, Any], examples_per_step: int | None = None,
              kind: str = "train") -> dict[str, Any]:
        record = {"step": int(step), "kind": kind, **{k: float(v) for k, v in metrics.items()}}
        if examples_per_step and self._clock and step > self._clock[1]:
            elapsed = time.perf_counter() - self._clock[0]
            steps_per_s = (step - self._clock[1]) / elapsed
            record["examples_per_s"] = steps_per_s * examples_per_step
            record["eta_s"] = (self.total_steps - step) / steps_per_s
        if not self.enabled:
            return record
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("step", "kind"):
                self._tensorboard.add_scalar(f"{kind}/{key}", value, step)
        self._tensorboard.flush()
        print(self.progress_line(record), flush=True)
        return record

    def progress_line(self, record: dict[str, Any]) -> str:
        parts = [f"[{record['kind']}] step {record['step']}/{self.total_steps}"]
        for key, value in record.items():
            if key in ("step", "kind", "examples_per_s", "eta_s"):
                continue
            parts.append(f"{key} {value:.4g}")
        if "examples_per_s" in record:
            rate = record["examples_per_s"]  # a large LM on a CPU runs < 1 ex/s
            parts.append(f"{rate:,.0f} ex/s" if rate >= 100 else f"{rate:.3g} ex/s")
            parts.append(f"ETA {_duration(record['eta_s'])}")
        return " | ".join(parts)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(workdir: str, strict: bool = True) -> list[dict[str, Any]]:
    """The records of WORKDIR/metrics.jsonl; `strict=False` skips a line cut short by a kill."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                if strict and line.strip():
                    raise
    return records


def plot_curves(workdir: str, metric: str = "accuracy") -> str | None:
    """WORKDIR/curves.png: training loss and the task's main eval `metric` against steps."""
    records = read_metrics(workdir)
    train = [r for r in records if r["kind"] == "train" and "loss" in r]
    evals = [r for r in records if r["kind"] == "eval" and metric in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_acc.plot([r["step"] for r in evals], [r[metric] for r in evals], "o-",
                label=f"eval {metric}")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel(metric)
    ax_acc.legend()
    fig.tight_layout()
    path = os.path.join(workdir, "curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
