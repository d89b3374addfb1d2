"""Audio input pipeline throughput: decode, crop, log-mel, examples per second.

    python tools/benchmark_audio.py [--dataset=spoken_keywords] [--examples=480] [--batches=20]

Measures on a prepared dataset (tools/prepare_data.py spoken_keywords):
  decode     - reading + decoding the files (soundfile), one thread;
  decode+pp  - the same plus `--pp` (default: random 1 s crop, 64-band log-mel as a 3-channel
               image), one thread;
  pipeline   - `tljax.data.train_batches` (grain threads, TLJAX_DATA_THREADS, default 4),
               batches of --batch after one warm-up batch;
  log-mel    - the log-mel of one --seconds clip: tljax's numpy op against the same maths
               jitted in JAX (one example per call, as an input pipeline would call it).
Writes benchmarks/audio_<machine>.json. Times are medians of --reps runs; on a shared
machine they are approximate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tljax import data  # noqa: E402
from tljax.data import audio, preprocess  # noqa: E402
from tljax.malloc import retain_freed_memory  # noqa: E402

DEFAULT_PP = ("pad_or_crop(seconds=1, random=True)|log_mel(sample_rate=16000, n_fft=400, "
              "hop=160, n_mels=64, channels=3)")


def _median_rate(fn: Any, count: int, reps: int) -> float:
    """Examples per second: `count` / median seconds of `fn()` over `reps` runs."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return count / float(np.median(times))


def _jax_log_mel(n_fft: int, hop: int, n_mels: int, rate: int):
    import jax
    import jax.numpy as jnp

    fb = jnp.asarray(audio.mel_filterbank(rate, n_fft, n_mels))
    window = jnp.asarray(audio._window("hann", n_fft, n_fft))

    @jax.jit
    def log_mel(x):
        x = jnp.pad(x, n_fft // 2)
        index = jnp.arange(n_fft)[None] + hop * jnp.arange(1 + (x.shape[0] - n_fft) // hop)[:, None]
        spectrum = jnp.fft.rfft(x[index] * window, axis=-1)
        power = spectrum.real**2 + spectrum.imag**2
        return 10 * jnp.log10(jnp.maximum(power @ fb.T, 1e-10))

    return lambda x: np.asarray(log_mel(x))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="spoken_keywords")
    parser.add_argument("--split", default="train")
    parser.add_argument("--pp", default=DEFAULT_PP)
    parser.add_argument("--examples", type=int, default=480)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent /
                                             "benchmarks"))
    args = parser.parse_args(argv)

    source, info = data.get_source(args.dataset, args.split, args.data_dir)
    n = min(args.examples, len(source))
    ops = preprocess.Preprocess(args.pp)
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {"dataset": args.dataset, "pp": args.pp, "examples": n}
    results["decode_ex_s"] = _median_rate(lambda: [source[i] for i in range(n)], n, args.reps)
    results["decode_pp_ex_s"] = _median_rate(
        lambda: [ops.example(source[i], rng) for i in range(n)], n, args.reps)

    batches = data.train_batches(dataset=args.dataset, split=args.split, pp=args.pp,
                                 batch_size=args.batch, seed=0, data_dir=args.data_dir)
    first = next(batches)  # warm-up: threads started, first files read
    shape = first["image" if "image" in first else "mel"].shape
    count = args.batch * args.batches
    results["pipeline_ex_s"] = _median_rate(
        lambda: [next(batches) for _ in range(args.batches)], count, args.reps)
    results["batch_shape"] = list(shape)
    results["threads"] = int(os.environ.get("TLJAX_DATA_THREADS", 4))

    clip = rng.standard_normal(round(16000 * args.seconds)).astype(np.float32)
    numpy_op = lambda x: audio.power_to_db(audio.mel_spectrogram(x, 16000, 400, 160, 64))
    jax_op = _jax_log_mel(400, 160, 64, 16000)
    jax_op(clip)  # compile
    reps = 200
    results["log_mel_ms"] = {
        name: 1e3 / _median_rate(lambda f=f: [f(clip) for _ in range(reps)], reps, args.reps)
        for name, f in (("numpy", numpy_op), ("jax_jit", jax_op))}
    results["setup"] = {"cpu_count": os.cpu_count(), "machine": platform.machine(),
                        "load_avg_1min": os.getloadavg()[0], "clip_seconds": args.seconds}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"audio_{platform.machine()}.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    retain_freed_memory()
    sys.exit(main())
