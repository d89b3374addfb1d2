"""Train and eval batch iterators: pure functions of the step, run ahead by threads or processes.

Train stream. Epoch e of the split is a permutation drawn from (seed, e); the epochs are
concatenated into one infinite *global* stream of examples, and global batch s is stream
positions [s*B, (s+1)*B). Process p of P takes the p-th of the P equal chunks of every global
batch. The random ops of the example at stream position g draw from an RNG seeded with (seed, g).
So the global batch at step s depends on neither the number of processes, nor threads, nor
where a run was resumed: a state is just the step. Batches straddle epoch boundaries (every
example is seen once per epoch, none is dropped).

Eval. Batch b covers examples [b*B, (b+1)*B) of the split; positions past the end are padding
(a copy of example 0 with mask False). Every process gets the same number of batches.

Each local batch is built as a whole (one batched read from the source, then the pp ops), and
grain's thread pool builds the next few batches while the current one is in use.

Bad examples. An example whose file cannot be read or decoded (`BadExampleError`) stops the
run in one line naming it (`on_bad_example='error'`, the default), or is skipped
(`'skip'`): the next readable example of the split takes its place (in eval, as padding with
mask False, so no example counts twice), deterministically, and `bad_examples` counts them
for the log (those met in this process: worker processes do not report theirs). A pp op that
fails on an example names the example and the pp string.

Threads or processes build the next few batches while the current one is in use:
  workers = 0   a thread pool in this process (TLJAX_DATA_THREADS, default: half the cores,
                1 to 4, leaving the rest to the train step): enough for
                reads and decoders that release the GIL, not for Python-heavy pp ops;
  workers = N   N worker processes (grain's `mp_prefetch`): worker k builds steps k, k + N, ...
                and the batches come back through shared memory in step order. Each worker
                opens the source and parses the pp string itself (spawned processes; the
                source is not pickled), and keeps its own decoded-image cache.
Since a batch is a function of (config, step) alone, the batches are the same, bitwise, with
any number of threads or workers, and the state stays the step. `train_batches(workers=...)`,
`config.input.workers`, or TLJAX_DATA_WORKERS (the default when neither is given) set it.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

from tljax.data.preprocess import Preprocess
from tljax.data.sources import BadExampleError, DatasetInfo, get_source
from tljax.errors import InputError

_STATE_VERSION = 1
_ENDLESS = 2**62  # Steps in the "infinite" train stream.
ON_BAD_EXAMPLE = ("error", "skip")
_MAX_BAD_IN_A_ROW = 100  # 'skip' gives up: the data, not an example, is broken
_SHOWN_BAD = 5  # bad examples named one by one in the log; later ones are only counted


class BadExamples:
    """The examples skipped under on_bad_example='skip' (shared by the pipeline's threads)."""

    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()

    def record(self, name: str, reason: BadExampleError) -> None:
        with self._lock:
            self.count += 1
            count = self.count
        if count <= _SHOWN_BAD:
            print(f"Skipping bad example {name}: {reason}"
                  f"{' (later ones are only counted)' if count == _SHOWN_BAD else ''}",
                  file=sys.stderr, flush=True)

    def counts(self) -> dict[str, int]:
        """{'bad_examples': n} once any was skipped, for the log line; else {}."""
        return {"bad_examples": self.count} if self.count else {}

    def __getstate__(self) -> dict[str, int]:  # a worker process counts its own
        return {"count": self.count}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.count, self._lock = state["count"], threading.Lock()


def default_data_threads(cores: int | None = None) -> int:
    """Half the cores, 1 to 4: on 2 cores one input thread, so the pipeline cannot take both
    cores from the step (the quickstart's pipeline needs 14 ms of CPU per 400 ms step)."""
    return max(1, min(4, (cores or os.cpu_count() or 1) // 2))


def _read_options(threads: int | None = None) -> grain.ReadOptions:
    # Threads overlap the GIL-free parts (ArrayRecord reads, PNG decoding, PIL, tokenizers).
    if threads is None:
        threads = int(os.environ.get("TLJAX_DATA_THREADS", default_data_threads()))
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)


def _workers(workers: int | None) -> int:
    workers = int(os.environ.get("TLJAX_DATA_WORKERS", 0)) if workers is None else int(workers)
    if workers < 0:
        raise ValueError(f"workers={workers}: expected 0 (threads) or a number of processes.")
    return workers


def _batch_stream(make_batch: Callable[[int], dict], first: int, end: int,
                  workers: int) -> grain.IterDataset:
    """Batches first .. end-1 in order, built by a thread pool or by `workers` processes."""
    steps = grain.MapDataset.range(first, end).map(make_batch)
    if not workers:
        return steps.to_iter_dataset(_read_options())
    # grain reads absl flags when it starts workers: outside an absl app (library use,
    # tests), take the flag defaults rather than fail.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    # One thread per worker: the processes are the parallelism; two batches buffered each.
    return steps.to_iter_dataset(_read_options(1)).mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))


def _local_batch_size(batch_size: int, process_count: int, process_index: int) -> int:
    if batch_size <= 0 or batch_size % process_count:
        raise InputError(
            f"batch_size {batch_size} (global) must be a positive multiple of process_count "
            f"{process_count}."
        )
    if not 0 <= process_index < process_count:
        raise InputError(f"process_index {process_index} not in [0, {process_count}).")
    return batch_size // process_count


def _fetch(source: Sequence, indices: Sequence[int]) -> list[dict]:
    """Reads several examples at once where the source supports it (ArrayRecord does)."""
    if hasattr(source, "__getitems__"):
        return list(source.__getitems__(indices))
    return [source[i] for i in indices]


class _Opened:
    """(source, Preprocess) of a pipeline; pickles as its arguments and reopens on arrival, so a
    worker process reads the dataset through its own handles instead of a pickled copy."""

    def __init__(self, dataset: str, split: str, data_dir: str | None, pp: str,
                 opened: tuple[Sequence, Preprocess] | None = None):
        self.args = (dataset, split, data_dir, pp)
        self._opened = opened

    def get(self) -> tuple[Sequence, Preprocess]:
        if self._opened is None:
            dataset, split, data_dir, pp = self.args
            source, _ = get_source(dataset, split, data_dir)
            self._opened = (source, Preprocess(pp))
        return self._opened

    def __getstate__(self) -> dict[str, Any]:
        return {"args": self.args}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.args, self._opened = state["args"], None


class _BatchMaker:
    """Builds the local batch at a step from stream positions, via `index_of` to source indices.

    `index_of(positions)` returns (source indices, mask); `seed` None means random ops get a
    fixed per-position RNG (eval), which keeps them reproducible too.
    """

    def __init__(
        self,
        opened: _Opened,
        index_of: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]],
        ops_seed: int,
        global_batch: int,
        local_batch: int,
        process_index: int,
        name: str = "",
        on_bad_example: str = "error",
    ):
        if on_bad_example not in ON_BAD_EXAMPLE:
            raise InputError(f"on_bad_example={on_bad_example!r}: expected one of "
                             f"{', '.join(ON_BAD_EXAMPLE)}.")
        self._opened, self._index_of = opened, index_of
        self._ops_seed = ops_seed
        self._global, self._local = global_batch, local_batch
        self._offset = process_index * local_batch
        self._name, self._skip = name, on_bad_example == "skip"
        self.bad_examples = BadExamples()

    def positions(self, step: int) -> np.ndarray:
        start = step * self._global + self._offset
        return np.arange(start, start + self._local, dtype=np.int64)

    @property
    def _source(self) -> Sequence:
        return self._opened.get()[0]

    @property
    def _preprocess(self) -> Preprocess:
        return self._opened.get()[1]

    def describe(self, index: int) -> str:
        """A person's name for example `index`: its file, else its index in the split."""
        describe = getattr(self._source, "describe", None)
        return (describe(index) if describe else None) or f"example {index} of {self._name}"

    def _rng(self, position: int) -> np.random.Generator | None:
        if not self._preprocess.is_random:
            return None
        return np.random.default_rng([self._ops_seed, position])

    def _example(self, position: int, index: int, example: dict | None,
                 mask: bool | None) -> dict:
        """The preprocessed example at `index` (read now unless given), or under 'skip' the
        next readable one in its place (masked out in eval)."""
        n = len(self._source)
        for offset in range(_MAX_BAD_IN_A_ROW):
            candidate = (index + offset) % n
            try:
                raw = example if offset == 0 and example is not None else self._source[candidate]
                if mask is not None:
                    raw = {**raw, "mask": bool(mask) and offset == 0}
                return self._preprocess.begin(raw, self._rng(position))
            except BadExampleError as e:
                if not self._skip:
                    raise BadExampleError(
                        f"Bad example {self.describe(candidate)}: {e}. Fix or remove it, or "
                        "set config.input.on_bad_example='skip' to skip such examples.") from e
                self.bad_examples.record(self.describe(candidate), e)
            except InputError:
                raise
            except (ValueError, KeyError, TypeError, IndexError, OSError) as e:
                raise InputError(f"pp {self._preprocess.pp!r} failed on "
                                 f"{self.describe(candidate)}: {type(e).__name__}: {e}") from e
        raise InputError(f"{_MAX_BAD_IN_A_ROW} bad examples in a row from "
                         f"{self.describe(index)}: the data is unreadable, not one example.")

    def __call__(self, step: int) -> dict[str, Any]:
        positions = self.positions(step)
        indices, mask = self._index_of(positions)
        indices = [int(i) for i in indices]
        try:
            examples: list[dict | None] = list(_fetch(self._source, indices))
        except BadExampleError:
            examples = [None] * len(indices)  # read one by one to find the bad ones
        masks = [None] * len(indices) if mask is None else [bool(m) for m in mask]
        batch = [self._example(int(g), i, e, m)
                 for g, i, e, m in zip(positions, indices, examples, masks, strict=True)]
        try:
            return self._preprocess.end(batch)
        except InputError as e:
            raise InputError(f"{e}{self._odd_one_out(batch, indices)}") from e
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise InputError(f"pp {self._preprocess.pp!r} failed on a batch of {self._name}: "
                             f"{type(e).__name__}: {e}") from e

    def _odd_one_out(self, batch: list[dict], indices: list[int]) -> str:
        """' (A is HxWxC, B is ...)': two examples whose shapes differ, by name."""
        for key in ("image", "audio", "mel"):
            shapes = [np.shape(e[key]) for e in batch if key in e]
            if len(set(shapes)) > 1:
                other = next(k for k, shape in enumerate(shapes) if shape != shapes[0])
                return (f" ({self.describe(indices[0])} has {key} shape {shapes[0]}, "
                        f"{self.describe(indices[other])} has {shapes[other]})")
        return ""


class _EpochPermutations:
    """Source index of every stream position: a fresh seeded permutation per epoch."""

    def __init__(self, num_examples: int, seed: int):
        self._n, self._seed = num_examples, seed

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a handful per pipeline, freed with it.
    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self._seed, epoch]).permutation(self._n)

    def __call__(self, positions: np.ndarray) -> tuple[np.ndarray, None]:
        epochs, offsets = np.divmod(positions, self._n)
        indices = np.empty_like(positions)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            indices[here] = self.permutation(int(epoch))[offsets[here]]
        return indices, None


def _seeds(seed: int) -> tuple[int, int]:
    """Independent 32-bit seeds for shuffling and for random ops."""
    shuffle_seed, ops_seed = np.random.SeedSequence(seed).generate_state(2)
    return int(shuffle_seed), int(ops_seed)


class TrainBatches(Iterator[dict]):
    """Infinite iterator over this process's train batches; its state is the step."""

    def __init__(self, make_batch: _BatchMaker, config: dict[str, Any], info: DatasetInfo,
                 workers: int = 0):
        self._make_batch = make_batch
        self._config = config
        self.info = info
        self.bad_examples = make_batch.bad_examples
        self.workers = workers
        self._step = 0
        self._iterator = None

    @property
    def step(self) -> int:
        """Number of batches handed out so far (the index of the next one)."""
        return self._step

    def batch_at(self, step: int) -> dict[str, Any]:
        """The local batch at `step`, computed directly (no prefetching)."""
        return self._make_batch(step)

    def indices_at(self, step: int) -> np.ndarray:
        """Source indices of the local batch at `step` (its examples, in order)."""
        indices, _ = self._make_batch._index_of(self._make_batch.positions(step))
        return indices

    def __next__(self) -> dict[str, Any]:
        if self._iterator is None:
            self._iterator = iter(_batch_stream(self._make_batch, self._step, _ENDLESS,
                                                self.workers))
        batch = next(self._iterator)
        self._step += 1
        return batch

    def close(self) -> None:
        """Stops the prefetching threads or worker processes (also done on set_state)."""
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown; nothing left to release
            pass

    def get_state(self) -> dict[str, Any]:
        """A JSON-serialisable state, valid for any process_index/process_count."""
        return {"version": _STATE_VERSION, "step": self._step, **self._config}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from `state`: the next batch is the one an uninterrupted run would see."""
        if state.get("version") != _STATE_VERSION:
            raise InputError(f"Unsupported train data state version {state.get('version')!r}.")
        changed = [
            f"{k}: saved {state.get(k)!r}, now {v!r}"
            for k, v in self._config.items()
            if state.get(k) != v
        ]
        if changed:
            raise InputError(
                f"The train data state is for another input pipeline ({'; '.join(changed)})."
            )
        self.close()  # Rebuilt from the new step on the next call.
        self._step = int(state["step"])


def _open(
    dataset: str, split: str, data_dir: str | None, preprocess: Preprocess
) -> tuple[Sequence, DatasetInfo]:
    source, info = get_source(dataset, split, data_dir)
    if len(source) == 0:
        raise InputError(f"Split {split!r} of {dataset!r} is empty.")
    # Caught here rather than as an odd error from a prefetch thread.
    text = sorted(k for k, f in info.features.items() if f.kind in ("text", "tokens"))
    if text and not preprocess.batch_ops:
        raise InputError(
            f"{dataset!r} is a text dataset ({', '.join(text)}): pp needs a tokenize op at the "
            f"end (tokenize(...) or tokenize_words(...)), got {preprocess.pp!r}."
        )
    for op in preprocess.batch_ops:
        key = getattr(op, "reads", None)
        if key is not None and key not in info.features:
            raise InputError(
                f"pp {preprocess.pp!r} tokenizes {key!r}, but {dataset!r} has no such feature "
                f"(it has {', '.join(sorted(info.features))})."
            )
    return source, info


def train_batches(
    *,
    dataset: str,
    split: str,
    pp: str,
    batch_size: int,
    seed: int,
    data_dir: str | None = None,
    process_index: int = 0,
    process_count: int = 1,
    on_bad_example: str = "error",
    workers: int | None = None,
) -> TrainBatches:
    """This process's share of an infinite, per-epoch reshuffled stream of global batches.

    Each batch is a dict of arrays with leading dimension b = batch_size // process_count,
    whatever keys the pp string leaves (e.g. 'image' float32 (b, H, W, C) and 'label' (b,)).
    `workers`: processes building batches (0: threads; None: $TLJAX_DATA_WORKERS or 0).
    """
    local = _local_batch_size(batch_size, process_count, process_index)
    preprocess = Preprocess(pp)
    source, info = _open(dataset, split, data_dir, preprocess)
    shuffle_seed, ops_seed = _seeds(seed)
    make_batch = _BatchMaker(
        _Opened(dataset, split, data_dir, pp, (source, preprocess)),
        _EpochPermutations(len(source), shuffle_seed),
        ops_seed,
        batch_size,
        local,
        process_index,
        name=f"{dataset} {split!r}",
        on_bad_example=on_bad_example,
    )
    config = {"dataset": dataset, "split": split, "pp": pp, "batch_size": batch_size, "seed": seed}
    return TrainBatches(make_batch, config, info, _workers(workers))


class EvalBatches(Iterator[dict]):
    """One pass over a split in padded batches; len() is the number of batches."""

    def __init__(self, make_batch: _BatchMaker, num_batches: int, info: DatasetInfo,
                 num_examples: int, workers: int = 0):
        self._num_batches = num_batches
        self._make_batch = make_batch
        self._iterator = iter(_batch_stream(make_batch, 0, num_batches, workers))
        self.info = info
        self.num_examples = num_examples
        self.bad_examples = make_batch.bad_examples

    def __len__(self) -> int:
        return self._num_batches

    def batch_at(self, index: int) -> dict[str, Any]:
        """Batch `index`, computed directly (no prefetching)."""
        return self._make_batch(index)

    def __next__(self) -> dict[str, Any]:
        return next(self._iterator)


def eval_batches(
    *,
    dataset: str,
    split: str,
    pp: str,
    batch_size: int,
    data_dir: str | None = None,
    process_index: int = 0,
    process_count: int = 1,
    on_bad_example: str = "error",
    workers: int = 0,
) -> EvalBatches:
    """Every example of `split` exactly once across processes, with 'mask' for real examples.

    `workers` as for `train_batches`, but 0 (threads) by default: an evaluation is short, and
    worker processes would start anew for each one.
    """
    local = _local_batch_size(batch_size, process_count, process_index)
    preprocess = Preprocess(pp)
    source, info = _open(dataset, split, data_dir, preprocess)
    n = len(source)

    def index_of(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        real = positions < n
        return np.where(real, positions, 0), real

    make_batch = _BatchMaker(_Opened(dataset, split, data_dir, pp, (source, preprocess)),
                             index_of, 0, batch_size, local, process_index,
                             name=f"{dataset} {split!r}", on_bad_example=on_bad_example)
    return EvalBatches(make_batch, math.ceil(n / batch_size), info, n, _workers(workers))
