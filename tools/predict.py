"""Classifies images or texts with the final checkpoint of a finished training run.

    python tools/predict.py --workdir=runs/bbc "Arsenal beat Chelsea 2-0 in the cup final."
    python tools/predict.py --workdir=runs/bbc --file=headlines.txt --top=2
    python tools/predict.py --workdir=runs/pets cat.jpg dog.png

The run's config.json rebuilds the model and its evaluation preprocessing (`eval.pp`), the
class names come from its results.json, the weights from its latest checkpoint (Orbax, no
pickle). A text run takes texts (arguments, or one per line of --file); an image run takes
image files. One line per input, classes by decreasing probability, then a tab and the input:

    sports 0.974 | business 0.011 | politics 0.007\tArsenal beat Chelsea 2-0 in the cup final.
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


class PredictError(Exception):
    """A problem the user can fix; the message says how."""


def _tuples(value: Any) -> Any:
    """JSON lists back to tuples: model fields such as patch_size are tuples in configs."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def read_run(workdir: str) -> tuple[dict[str, Any], list[str]]:
    """(config as a dict, class names) of a finished run, or a PredictError saying what is off."""
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
    class_names = results.get("class_names")
    if not class_names:
        raise PredictError(f"{results_file} lists no class_names; it was written by an older "
                           "tljax. Re-run the training to get one.")
    return config, list(class_names)


def is_text_run(config: dict[str, Any]) -> bool:
    return "tokenize" in config["eval"]["pp"]


class Predictor:
    """A finished run's model, eval preprocessing and class names, ready to classify."""

    def __init__(self, workdir: str):
        import jax
        import jax.numpy as jnp

        from tljax import checkpoint, models
        from tljax.data.preprocess import Preprocess

        self.config, self.class_names = read_run(workdir)
        self.is_text = is_text_run(self.config)
        self.preprocess = Preprocess(self.config["eval"]["pp"])
        model_kwargs = _tuples(dict(self.config.get("model") or {}))
        if self.config.get("compute_dtype", "float32") != "float32":
            model_kwargs["dtype"] = jnp.dtype(self.config["compute_dtype"])
        self.model = models.build_model(self.config["model_name"],
                                        num_classes=len(self.class_names), **model_kwargs)
        try:
            self.variables, metadata = checkpoint.load_variables(workdir)
        except FileNotFoundError as e:
            raise PredictError(f"{e} The run's checkpoints were deleted or never written; "
                               "re-run the training.") from None
        self.step = metadata.get("step")
        sigmoid = self.config.get("loss") == "sigmoid_xent"
        self._probabilities = jax.jit(lambda variables, inputs: (
            jax.nn.sigmoid if sigmoid else jax.nn.softmax)(
                self.model.apply(variables, inputs, train=False)))

    def _examples(self, inputs: Sequence[str]) -> list[dict[str, Any]]:
        if self.is_text:
            return [{"text": text, "label": 0} for text in inputs]
        from PIL import UnidentifiedImageError

        from tljax.data.preprocess import decode_image

        examples = []
        for path in inputs:
            if not os.path.isfile(path):
                raise PredictError(f"No image file {path} (this run classifies images; give "
                                   "paths to .png/.jpg files).")
            try:
                image = decode_image(Path(path))
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise PredictError(f"Cannot read image {path}: {e}") from None
            examples.append({"image": image, "label": 0})
        return examples

    def probabilities(self, inputs: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(len(inputs), num_classes) class probabilities."""
        rng = np.random.default_rng(0)  # eval pp is deterministic; the op signature wants one
        out = []
        for start in range(0, len(inputs), batch_size):
            examples = self._examples(inputs[start:start + batch_size])
            try:
                batch = self.preprocess(examples, rng)
            except ValueError as e:
                raise PredictError(f"The run's eval preprocessing {self.config['eval']['pp']!r} "
                                   f"failed on these inputs: {e}") from None
            out.append(np.asarray(self._probabilities(self.variables, batch["inputs"])))
        return np.concatenate(out)

    def top(self, inputs: Sequence[str], k: int = 3) -> list[list[tuple[str, float]]]:
        """For each input, the k most probable (class name, probability) pairs."""
        result = []
        for probs in self.probabilities(inputs):
            order = np.argsort(-probs, kind="stable")[:k]
            result.append([(self.class_names[i], float(probs[i])) for i in order])
        return result


def format_top(top: Sequence[tuple[str, float]]) -> str:
    return " | ".join(f"{name} {prob:.3f}" for name, prob in top)


def _read_lines(file: str) -> list[str]:
    try:
        with open(file, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise PredictError(f"Cannot read --file={file}: {e.strerror}.") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="texts (text runs) or image files (image runs)")
    parser.add_argument("--workdir", required=True, help="the training run's --workdir")
    parser.add_argument("--file", help="text run: a file with one text per line")
    parser.add_argument("--top", type=int, default=3, help="classes shown per input")
    args = parser.parse_args(argv)
    # Reading a checkpoint read-only on the host makes Orbax log setup notes that would bury
    # the predictions; they say nothing about the result.
    from absl import logging

    logging.set_verbosity(logging.ERROR)
    warnings.filterwarnings("ignore", message="Sharding info not provided")
    try:
        config, _ = read_run(args.workdir)  # cheap checks before importing JAX
        inputs = list(args.inputs)
        if args.file:
            if not is_text_run(config):
                raise PredictError("--file takes texts, but this run classifies images; give "
                                   "the image files as arguments.")
            inputs += _read_lines(args.file)
        if not inputs:
            kind = "texts (or --file=lines.txt)" if is_text_run(config) else "image files"
            raise PredictError(f"Nothing to classify: give {kind} after --workdir.")
        predictor = Predictor(args.workdir)
        for text, top in zip(inputs, predictor.top(inputs, max(args.top, 1)), strict=True):
            shown = " ".join(text.split())
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            print(f"{format_top(top)}\t{shown}")
    except PredictError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
