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
grain builds the next few batches while the current one is in use:
  workers = 0   a thread pool in this process (TLJAX_DATA_THREADS, default 4): enough for
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
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

from tljax.data.preprocess import Preprocess
from tljax.data.sources import DatasetInfo, get_source

_STATE_VERSION = 1
_ENDLESS = 2**62  # Steps in the "infinite" train stream.


def _read_options(threads: int | None = None) -> grain.ReadOptions:
    # Threads overlap the GIL-free parts (ArrayRecord reads, PNG decoding, PIL, tokenizers).
    threads = int(os.environ.get("TLJAX_DATA_THREADS", 4)) if threads is None else threads
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
        raise ValueError(
            f"batch_size {batch_size} (global) must be a positive multiple of process_count "
            f"{process_count}."
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
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
    ):
        self._opened, self._index_of = opened, index_of
        self._ops_seed = ops_seed
        self._global, self._local = global_batch, local_batch
        self._offset = process_index * local_batch

    def positions(self, step: int) -> np.ndarray:
        start = step * self._global + self._offset
        return np.arange(start, start + self._local, dtype=np.int64)

    def __call__(self, step: int) -> dict[str, Any]:
        positions = self.positions(step)
        indices, mask = self._index_of(positions)
        source, pp = self._opened.get()
        examples = _fetch(source, [int(i) for i in indices])
        if mask is not None:
            examples = [{**e, "mask": bool(m)} for e, m in zip(examples, mask, strict=True)]
        rngs = (
            (np.random.default_rng([self._ops_seed, int(g)]) for g in positions)
            if pp.is_random
            else (None for _ in positions)
        )
        return pp.batch(examples, list(rngs))


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
            raise ValueError(f"Unsupported train data state version {state.get('version')!r}.")
        changed = [
            f"{k}: saved {state.get(k)!r}, now {v!r}"
            for k, v in self._config.items()
            if state.get(k) != v
        ]
        if changed:
            raise ValueError(
                f"The train data state is for another input pipeline ({'; '.join(changed)})."
            )
        self.close()  # Rebuilt from the new step on the next call.
        self._step = int(state["step"])


def _open(
    dataset: str, split: str, data_dir: str | None, preprocess: Preprocess
) -> tuple[Sequence, DatasetInfo]:
    source, info = get_source(dataset, split, data_dir)
    if len(source) == 0:
        raise ValueError(f"Split {split!r} of {dataset!r} is empty.")
    # Caught here rather than as an odd error from a prefetch thread.
    text = sorted(k for k, f in info.features.items() if f.kind in ("text", "tokens"))
    if text and not preprocess.batch_ops:
        raise ValueError(
            f"{dataset!r} is a text dataset ({', '.join(text)}): pp needs a tokenize op at the "
            f"end (tokenize(...) or tokenize_words(...)), got {preprocess.pp!r}."
        )
    for op in preprocess.batch_ops:
        key = getattr(op, "reads", None)
        if key is not None and key not in info.features:
            raise ValueError(
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
    )
    config = {"dataset": dataset, "split": split, "pp": pp, "batch_size": batch_size, "seed": seed}
    return TrainBatches(make_batch, config, info, _workers(workers))


class EvalBatches(Iterator[dict]):
    """One pass over a split in padded batches; len() is the number of batches."""

    def __init__(self, make_batch: _BatchMaker, num_batches: int, info: DatasetInfo,
                 workers: int = 0):
        self._num_batches = num_batches
        self._iterator = iter(_batch_stream(make_batch, 0, num_batches, workers))
        self.info = info

    def __len__(self) -> int:
        return self._num_batches

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
                             index_of, 0, batch_size, local, process_index)
    return EvalBatches(make_batch, math.ceil(n / batch_size), info, _workers(workers))
