"""Few-shot speaker identification with the frozen GE2E encoder: 1, 2, 5 ... clips per voice.

    python experiments/ge2e_few_shot.py [--shots=1,2,5,20] [--draws=50] [--dataset=spoken_speakers]
                                        [--data_dir=DIR] [--report=FILE.json]

Every clip of the dataset (default `spoken_speakers`: 12 synthesized voices, 20 train and 5
test clips each, see tljax.data.speech) is embedded once with resemblyzer's pretrained GE2E
encoder (`tljax.pretrained.ge2e.embed_utterance`: 1.6 s windows, mean of the window
embeddings, unit norm; no weight changes). Then, for k clips per voice drawn from train (the
enrolment), every test clip is classified by

  centroid   cosine similarity to each voice's mean enrolment embedding, the highest wins: the
             GE2E paper's own speaker rule, with nothing trained;
  logreg     multinomial logistic regression on the enrolment embeddings (scikit-learn,
             L2, C=10): the linear probe `configs/audio.py:task=speaker,model=ge2e,
             freeze=linear_probe` trains, fitted exactly instead of by SGD.

Accuracies are means over `draws` random enrolment draws (the same draws for every method).
As a reference without pretraining, the same two classifiers run on a classical speaker
feature: the per-band mean and standard deviation over time of the clip's 40-band log-mel
spectrogram (80 numbers, standardised on the enrolment clips).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tljax import data  # noqa: E402
from tljax.malloc import retain_freed_memory  # noqa: E402

_SHOTS = flags.DEFINE_list("shots", ["1", "2", "5", "20"], "Enrolment clips per voice.")
_DRAWS = flags.DEFINE_integer("draws", 50, "Random enrolment draws per shot count.")
_DATASET = flags.DEFINE_string("dataset", "spoken_speakers",
                               "An audio dataset with train and test splits (classes = voices).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Default: $TFDS_DATA_DIR or "
                                "~/tensorflow_datasets.")
_REPORT = flags.DEFINE_string("report", None, "Also write the results here (JSON).")

METHODS = ("centroid", "logreg")


def embed_split(dataset: str, split: str, data_dir: str | None) -> dict[str, np.ndarray]:
    """{'ge2e': (N, 256) unit embeddings, 'logmel_stats': (N, 80), 'label': (N,)}."""
    import tljax
    from tljax.data import audio
    from tljax.pretrained import ge2e

    model, variables, _ = tljax.load_pretrained("ge2e")
    source, _ = data.get_source(dataset, split, data_dir)
    rows: dict[str, list[Any]] = {"ge2e": [], "logmel_stats": [], "label": []}
    for i in range(len(source)):
        example = source[i]
        wav = ge2e.preprocess_wav(example["audio"], example["sample_rate"])
        rows["ge2e"].append(ge2e.embed_utterance(model, variables, wav, preprocess=False))
        logmel = audio.power_to_db(ge2e.mel_frames(wav))
        rows["logmel_stats"].append(np.concatenate([logmel.mean(0), logmel.std(0)]))
        rows["label"].append(example["label"])
    return {k: np.stack(v) for k, v in rows.items()}


def enrolment_draws(labels: np.ndarray, shots: int, draws: int, seed: int = 0
                    ) -> list[np.ndarray]:
    """`draws` index sets holding `shots` distinct train clips of every class."""
    rng = np.random.default_rng([seed, shots])
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    if min(len(ix) for ix in by_class) < shots:
        raise ValueError(f"shots={shots}: some class has only {min(map(len, by_class))} train "
                         "clips.")
    return [np.concatenate([rng.choice(ix, shots, replace=False) for ix in by_class])
            for _ in range(draws)]


def classify(method: str, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
             cosine: bool) -> np.ndarray:
    """Predicted test labels. `cosine`: features are directions (GE2E) - no standardising."""
    if not cosine:  # scale each dimension by the enrolment statistics
        mean, std = train_x.mean(0), train_x.std(0) + 1e-6
        train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = np.unique(train_y)
    if method == "centroid":
        centroids = np.stack([train_x[train_y == c].mean(0) for c in classes])
        if cosine:
            centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
            return classes[np.argmax(test_x @ centroids.T, axis=1)]
        distances = ((test_x[:, None, :] - centroids[None]) ** 2).sum(-1)
        return classes[np.argmin(distances, axis=1)]
    if method == "logreg":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=10.0, max_iter=2000).fit(train_x, train_y).predict(test_x)
    raise ValueError(f"method={method!r}: expected one of {METHODS}.")


def few_shot(train: dict[str, np.ndarray], test: dict[str, np.ndarray], shots: list[int],
             draws: int) -> dict[str, Any]:
    """{feature: {method: {shots: (mean accuracy, std over draws)}}}."""
    results: dict[str, Any] = {}
    for feature in ("ge2e", "logmel_stats"):
        results[feature] = {}
        for method in METHODS:
            per_shot = {}
            for k in shots:
                accuracies = []
                for ix in enrolment_draws(train["label"], k, draws):
                    predicted = classify(method, train[feature][ix], train["label"][ix],
                                         test[feature], cosine=feature == "ge2e")
                    accuracies.append(float(np.mean(predicted == test["label"])))
                per_shot[k] = (float(np.mean(accuracies)), float(np.std(accuracies)))
            results[feature][method] = per_shot
    return results


def format_report(results: dict[str, Any], shots: list[int], num_classes: int,
                  num_test: int) -> str:
    head = f"{'features':<14}{'classifier':<11}" + "".join(f"{f'{k} per voice':>16}"
                                                         for k in shots)
    rows = [head]
    for feature, methods in results.items():
        for method, per_shot in methods.items():
            cells = "".join(f"{100 * per_shot[k][0]:>10.1f}% ±{100 * per_shot[k][1]:>4.1f}"
                            for k in shots)
            rows.append(f"{feature:<14}{method:<11}{cells}")
    rows.append(f"{num_classes} voices, {num_test} test clips; chance {100 / num_classes:.1f}%; "
                "mean ± std over enrolment draws.")
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    shots = sorted(int(s) for s in _SHOTS.value)
    start = time.perf_counter()
    train = embed_split(_DATASET.value, "train", _DATA_DIR.value)
    test = embed_split(_DATASET.value, "test", _DATA_DIR.value)
    seconds = time.perf_counter() - start
    results = few_shot(train, test, shots, _DRAWS.value)
    num_classes = len(np.unique(train["label"]))
    print(format_report(results, shots, num_classes, len(test["label"])))
    print(f"Embedding {len(train['label']) + len(test['label'])} clips took {seconds:.0f} s.")
    if _REPORT.value:
        with open(_REPORT.value, "w") as f:
            json.dump({"dataset": _DATASET.value, "draws": _DRAWS.value, "results": results,
                       "embed_seconds": seconds}, f, indent=2)


if __name__ == "__main__":
    retain_freed_memory()
    app.run(main)
