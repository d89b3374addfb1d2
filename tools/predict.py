"""Predicts with the final checkpoint of a finished training run, for a person to read.

    python tools/predict.py --workdir=runs/bbc "Arsenal beat Chelsea 2-0 in the cup final."
    python tools/predict.py --workdir=runs/bbc --file=headlines.txt --top=2
    python tools/predict.py --workdir=runs/pets cat.jpg dog.png
    python tools/predict.py --workdir=runs/kws yes.wav clip.flac
    python tools/predict.py --workdir=runs/ner "Apple opens a new store in Paris"
    python tools/predict.py --workdir=runs/det scene.png --out_dir=predictions
    python tools/predict.py --workdir=runs/lm --max_new_tokens=40 --temperature=0.8 \
        --top_p=0.95 --seed=1 "The new phone"

The run's config.json rebuilds the task and the model (the same factory as training) and
its evaluation preprocessing (`eval.pp`); results.json names the classes and describes the
dataset's features, which decide what an input is (an image file, an audio file, a text, a
sentence to split into words); the weights come from the newest checkpoint that restores
(Orbax, no pickle; an unreadable newer one is named in one line and skipped). One
line per input, the task's reading of the prediction, then a tab and the input:

    sports 0.974 | business 0.011 | politics 0.007\tArsenal beat Chelsea 2-0 in the cup final.
    Apple [company] | Paris [geo-loc]\tApple opens a new store in Paris

Tasks that can draw their prediction (segmentation: the mask blended in; detection: boxes and
labels) also write each input image with it as OUT_DIR/<input name>.png (default
WORKDIR/predictions), through the task's `render`.

Tasks that generate text (causal_lm continues the input; seq2seq maps it to a target)
decode with the KV cache (tljax.generate): greedy by default, or sampled with
--temperature and --top_p (nucleus) from --seed, for at most --max_new_tokens tokens or
until the task's eos; the line is the generated text ('\n' for newlines).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from tljax.errors import InputError, report  # noqa: E402


class PredictError(InputError):
    """A problem the user can fix; the message says how."""


def read_run(workdir: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, results) of a finished run, or a PredictError saying what is off."""
    if not os.path.isdir(workdir):
        raise PredictError(f"No run directory {workdir}.")
    config_file = os.path.join(workdir, "config.json")
    if not os.path.exists(config_file):
        raise PredictError(f"{workdir} is not a training run directory (no config.json); pass "
                           "the --workdir given to `python -m tljax.main`.")
    results_file = os.path.join(workdir, "results.json")
    if not os.path.exists(results_file):
        raise PredictError(
            f"The run in {workdir} has not finished (no results.json). Finish it by running "
            f"`python -m tljax.main --config=... --workdir={workdir}` again with the same "
            "config: it resumes from the last checkpoint.")
    with open(config_file) as f:
        config = json.load(f)
    with open(results_file) as f:
        results = json.load(f)
    if not results.get("features"):
        raise PredictError(f"{results_file} does not describe the dataset's features; it was "
                           "written by an older tljax. Re-run the training to get one.")
    return config, results


def input_kind(results: dict[str, Any]) -> str:
    """'image' or 'audio' when the run reads those (files), else 'text' (texts or sentences)."""
    kinds = {f["kind"] for f in results["features"].values()}
    return next((kind for kind in ("image", "audio") if kind in kinds), "text")


class Predictor:
    """A finished run's task, model and eval preprocessing, ready to predict."""

    def __init__(self, workdir: str):
        import jax

        from tljax import checkpoint, models, tasks
        from tljax.data import DatasetInfo, Feature, Preprocess

        self.config, results = read_run(workdir)
        features = {k: Feature(f["kind"], tuple(f["names"]) if f.get("names") else None)
                    for k, f in results["features"].items()}
        info = DatasetInfo(results.get("dataset", ""), features, {})
        self.task = tasks.build_task(self.config.get("task"), info)
        self.preprocess = Preprocess(self.config["eval"]["pp"])
        self.model = models.from_config(self.config, self.task)
        try:
            self.variables, metadata = checkpoint.load_variables(workdir)
        except FileNotFoundError as e:
            raise PredictError(f"{e} The run's checkpoints were deleted or never written; "
                               "re-run the training.") from None
        self.step = metadata.get("step")
        self.draws = type(self.task).render is not tasks.Task.render
        self._outputs = jax.jit(lambda variables, inputs: self.model.apply(
            variables, inputs, train=False))
        self.generation = dict(max_new_tokens=32, temperature=0.0, top_p=1.0, seed=0)

    def _generate(self, batch: dict[str, Any]) -> np.ndarray:
        """New token ids (B, max_new_tokens) after each preprocessed input."""
        import jax

        from tljax.generate import generate

        options = dict(self.generation)
        if "input_ids" not in batch:
            raise PredictError(f"The run's eval preprocessing {self.config['eval']['pp']!r} "
                               "makes no input_ids to generate from.")
        return generate(self.model, self.variables, batch["input_ids"],
                        batch.get("attention_mask"), options["max_new_tokens"],
                        options["temperature"], options["top_p"],
                        jax.random.PRNGKey(options["seed"]), eos_id=self.task.eos_id)

    def outputs(self, inputs: Sequence[str]) -> tuple[np.ndarray, dict[str, Any]]:
        """(model outputs, preprocessed batch) for raw inputs (paths or texts); generated
        token ids for tasks that generate."""
        import jax
        from flax.errors import FlaxError

        from tljax import models

        rng = np.random.default_rng(0)  # eval pp is deterministic; the op signature wants one
        examples = [self.task.parse_input(text) for text in inputs]
        try:
            batch = self.preprocess(examples, rng)
        except (ValueError, KeyError) as e:
            raise PredictError(f"The run's eval preprocessing {self.config['eval']['pp']!r} "
                               f"failed on these inputs: {e}") from None
        device_batch = {k: v for k, v in batch.items() if np.asarray(v).dtype != object}
        try:
            if self.task.generates:
                return self._generate(device_batch), batch
            outputs = self._outputs(self.variables, models.inputs_of(self.model, device_batch))
        except (ValueError, TypeError, KeyError, FlaxError) as e:
            shapes = ", ".join(f"{k} {np.shape(v)}" for k, v in sorted(device_batch.items()))
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PredictError(f"The run's model cannot take these inputs ({shapes} after the "
                               f"eval pp {self.config['eval']['pp']!r}): {first}") from None
        return jax.tree_util.tree_map(np.asarray, outputs), batch

    def describe(self, inputs: Sequence[str], top: int = 3, batch_size: int = 64,
                 out_dir: str | None = None) -> list[str]:
        """One line per input: the task's reading of the prediction. With `out_dir`, tasks
        that draw (`Task.render`) also write OUT_DIR/<input stem>.png per input."""
        lines = []
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start:start + batch_size]
            outputs, batch = self.outputs(chunk)
            lines += self.task.describe(outputs, batch, top)
            if out_dir is not None and self.draws:
                images = [self.task.parse_input(text)["image"] for text in chunk]
                pictures = self.task.render(outputs, batch, images)
                for text, picture in zip(chunk, pictures or (), strict=False):
                    write_png(picture, os.path.join(out_dir, Path(text).stem + ".png"))
        return lines


def write_png(picture: np.ndarray, path: str) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(np.asarray(picture, np.uint8)).save(path)
    print(f"wrote {path}", file=sys.stderr)


def _read_lines(file: str) -> list[str]:
    try:
        with open(file, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise PredictError(f"Cannot read --file={file}: {e.strerror}.") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="texts or sentences (text runs), image or audio files (image or "
                        "audio runs)")
    parser.add_argument("--workdir", required=True, help="the training run's --workdir")
    parser.add_argument("--file", help="text run: a file with one text per line")
    parser.add_argument("--top", type=int, default=3, help="classes shown per input")
    parser.add_argument("--out_dir", default=None,
                        help="where tasks that draw (segmentation, detection) write one PNG "
                             "per input (default: WORKDIR/predictions)")
    parser.add_argument("--max_new_tokens", type=int, default=32,
                        help="text generation: most tokens generated per input")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="text generation: 0 is greedy, > 0 samples")
    parser.add_argument("--top_p", type=float, default=1.0,
                        help="text generation: sample from the smallest set of tokens whose "
                             "probability reaches top_p (nucleus)")
    parser.add_argument("--seed", type=int, default=0, help="text generation: sampling seed")
    parser.add_argument("--verbose", action="store_true", help="tracebacks for input errors")
    args = parser.parse_args(argv)
    # Reading a checkpoint read-only on the host makes Orbax log setup notes that would bury
    # the predictions; they say nothing about the result.
    from absl import logging

    logging.set_verbosity(logging.ERROR)
    warnings.filterwarnings("ignore", message="Sharding info not provided")
    try:
        config, results = read_run(args.workdir)  # cheap checks before importing JAX
        kind = input_kind(results)
        inputs = list(args.inputs)
        if args.file:
            if kind != "text":
                reads = "images" if kind == "image" else kind
                raise PredictError(f"--file takes texts, but this run reads {reads}; give "
                                   f"the {kind} files as arguments.")
            inputs += _read_lines(args.file)
        if not inputs:
            what = "texts (or --file=lines.txt)" if kind == "text" else f"{kind} files"
            raise PredictError(f"Nothing to predict: give {what} after --workdir.")
        if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
            raise PredictError("Need --max_new_tokens >= 1, --temperature >= 0 and "
                               "0 < --top_p <= 1.")
        predictor = Predictor(args.workdir)
        predictor.generation = dict(max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, top_p=args.top_p,
                                    seed=args.seed)
        out_dir = args.out_dir or os.path.join(args.workdir, "predictions")
        lines = predictor.describe(inputs, max(args.top, 1), out_dir=out_dir)
        for text, line in zip(inputs, lines, strict=True):
            shown = " ".join(text.split())
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            print(f"{line}\t{shown}")
    except InputError as e:
        if args.verbose:
            raise
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
