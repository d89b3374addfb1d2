"""Input pipeline: datasets (TFDS array_record, bbc_news, wnut16, image folders, text and CoNLL
files; see `register_source`), pp strings, and deterministic, resumable, process-sharded
train/eval batch iterators.

    from tljax import data
    train = data.train_batches(dataset="fashion_mnist", split="train[:98%]",
                               pp="decode|resize(32)|rgb|value_range(-1, 1)",
                               batch_size=256, seed=0)
    batch = next(train)          # {'image': float32 (256, 32, 32, 3), 'label': int32 (256,)}
    state = train.get_state()    # JSON-serialisable; train.set_state(state) resumes exactly

TensorFlow is not imported on the read path; only tools/prepare_data.py needs it.
"""

from tljax.data import audio  # noqa: F401 - registers the audio pp ops
from tljax.data.pipeline import EvalBatches, TrainBatches, eval_batches, train_batches
from tljax.data.preprocess import Preprocess, available_ops
from tljax.data.sources import (
    DatasetInfo,
    DatasetNotPreparedError,
    Feature,
    get_source,
    register_source,
)

__all__ = [
    "DatasetInfo",
    "DatasetNotPreparedError",
    "EvalBatches",
    "Feature",
    "Preprocess",
    "TrainBatches",
    "available_ops",
    "eval_batches",
    "get_source",
    "register_source",
    "train_batches",
]
