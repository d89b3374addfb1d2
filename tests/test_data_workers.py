"""Worker processes in the input pipeline, and the fast JPEG decoder.

Batches are a function of (config, step): built by threads, by one worker process or by
several, they must be the same bitwise, and a pipeline resumed from its state with workers
must continue exactly. JPEGs are real photos (scikit-image) encoded here; the simplejpeg
decoder must give PIL's pixels exactly (both are libjpeg-turbo with the same settings).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tljax.data import pipeline, preprocess

skimage_data = pytest.importorskip("skimage.data")

PP = "decode|inception_crop(48)|flip_lr|value_range(-1, 1)"


def _jpeg(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def _pil(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        array = np.asarray(im.convert("RGB") if im.mode == "CMYK" else im)
    return array[..., None] if array.ndim == 2 else array


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> str:
    """24 JPEGs (crops of four photos, two classes) as an image folder dataset."""
    root = tmp_path_factory.mktemp("photos")
    photos = [skimage_data.chelsea(), skimage_data.coffee(), skimage_data.astronaut(),
              skimage_data.rocket()]
    rng = np.random.default_rng(0)
    for i in range(24):
        photo = photos[i % 4]
        h, w = rng.integers(96, 200), rng.integers(96, 200)
        top, left = rng.integers(0, photo.shape[0] - h), rng.integers(0, photo.shape[1] - w)
        folder = root / "train" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:03d}.jpg").write_bytes(_jpeg(photo[top:top + h, left:left + w],
                                                    quality=90))
    return f"folder:{root}"


def test_fast_jpeg_decoder_gives_pil_pixels():
    assert preprocess.simplejpeg is not None, "simplejpeg is a dependency"
    photo = skimage_data.astronaut()
    cases = {"rgb q90": _jpeg(photo, quality=90),
             "rgb 4:4:4": _jpeg(photo, quality=95, subsampling=0),
             "progressive": _jpeg(photo, quality=75, progressive=True),
             "gray": _jpeg(skimage_data.camera())}
    for name, data in cases.items():
        ours = preprocess.decode_image(data)
        assert preprocess._decode_jpeg(data) is not None, name  # the fast path ran
        np.testing.assert_array_equal(ours, _pil(data), err_msg=name)
    assert preprocess.decode_image(cases["gray"]).shape == (512, 512, 1)
    # CMYK is not simplejpeg's: PIL decodes it (to RGB).
    cmyk = io.BytesIO()
    Image.fromarray(photo).convert("CMYK").save(cmyk, format="JPEG")
    assert preprocess._decode_jpeg(cmyk.getvalue()) is None
    assert preprocess.decode_image(cmyk.getvalue()).shape == (512, 512, 3)


def test_in_place_pixel_ops_are_bitwise_the_formulas():
    """value_range and normalize work in place on one copy; the numbers must not change."""
    rng = np.random.default_rng(0)
    images = {"uint8": rng.integers(0, 256, (32, 24, 3), dtype=np.uint8),
              "float32": rng.uniform(-3, 300, (32, 24, 3)).astype(np.float32)}
    for name, image in images.items():
        before = image.copy()
        out = preprocess.value_range(-1, 1)({"image": image}, None)["image"]
        expected = (image.astype(np.float32) - 0) * np.float32(2 / 255) + np.float32(-1)
        assert out.tobytes() == expected.tobytes(), name
        out = preprocess.value_range(0, 1, in_min=-80, in_max=0, clip_values=True)(
            {"image": image}, None)["image"]
        expected = np.clip((image.astype(np.float32) + 80) * np.float32(1 / 80)
                           + np.float32(0), 0, 1)
        assert out.tobytes() == expected.tobytes(), name
        mean, std = np.asarray([0.485, 0.456, 0.406], np.float32), np.asarray(
            [0.229, 0.224, 0.225], np.float32)
        out = preprocess.normalize(mean, std)({"image": image}, None)["image"]
        x = image.astype(np.float32) * (np.float32(1 / 255) if name == "uint8" else 1)
        assert out.tobytes() == ((x - mean) * (1 / std)).tobytes(), name
        np.testing.assert_array_equal(image, before)  # the input is never written


@pytest.mark.parametrize("pp", [
    "inception_crop(32)|flip_lr|value_range(-1, 1)",
    "central_crop(40)|normalize((0.5, 0.4, 0.3), (0.2, 0.3, 0.4))|value_range(0, 1, 0, 4)",
    "value_range(-1, 1)|random_crop(40)",  # pointwise op not trailing: per example
    "onehot(4)|central_crop(40)|value_range(-1, 1)",
])
def test_batched_pointwise_ops_give_the_per_example_batch(pp):
    rng = np.random.default_rng(0)
    examples = [{"image": rng.integers(0, 256, (48, 56, 3), dtype=np.uint8), "label": i % 4}
                for i in range(5)]
    ops = preprocess.Preprocess(pp)
    rngs = lambda: [np.random.default_rng([7, i]) for i in range(5)]
    expected = ops.collate([ops.example(e, r) for e, r in zip(examples, rngs(), strict=True)])
    batch = ops.batch(examples, rngs())
    assert list(batch) == list(expected)
    for key in expected:
        assert batch[key].dtype == expected[key].dtype, key
        assert batch[key].tobytes() == expected[key].tobytes(), key


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes(), k


def test_worker_processes_give_the_same_batches_and_resume_exactly(photo_folder):
    def batches(workers):
        return pipeline.train_batches(dataset=photo_folder, split="train", pp=PP,
                                      batch_size=4, seed=3, workers=workers)

    threads = batches(0)
    expected = _take(threads, 8)  # 32 examples: crosses the epoch boundary at 24
    threads.close()
    one = batches(1)
    _assert_same(_take(one, 8), expected)
    one.close()

    two = batches(2)
    _assert_same(_take(two, 3), expected[:3])
    state = two.get_state()
    two.close()
    assert state["step"] == 3
    resumed = batches(2)
    resumed.set_state(state)
    _assert_same(_take(resumed, 5), expected[3:])
    resumed.close()


def test_workers_read_tfds_sources_and_env_default(fashion_mnist_dir, monkeypatch):
    kwargs = dict(dataset="fashion_mnist", split="train[:512]", batch_size=32, seed=0,
                  data_dir=fashion_mnist_dir, pp="decode|flip_lr|rgb|value_range(-1, 1)")
    expected = _take(pipeline.train_batches(**kwargs, workers=0), 3)
    monkeypatch.setenv("TLJAX_DATA_WORKERS", "2")
    workers = pipeline.train_batches(**kwargs)
    assert workers.workers == 2
    _assert_same(_take(workers, 3), expected)
    workers.close()
    with pytest.raises(ValueError, match="expected 0 \\(threads\\)"):
        pipeline.train_batches(**kwargs, workers=-1)


def test_opened_pipeline_pickles_as_its_arguments(photo_folder):
    import pickle

    opened = pipeline._Opened(photo_folder, "train", None, PP)
    source, _ = opened.get()
    copy = pickle.loads(pickle.dumps(opened))
    assert copy.args == opened.args and copy._opened is None
    assert len(copy.get()[0]) == len(source) == 24
    assert Path(photo_folder[len("folder:"):]).is_dir()


def test_input_threads_leave_cores_to_the_step(monkeypatch):
    assert [pipeline.default_data_threads(cores) for cores in (1, 2, 3, 4, 8, 96)] == \
        [1, 1, 1, 2, 4, 4]
    monkeypatch.setenv("TLJAX_DATA_THREADS", "3")
    assert pipeline._read_options().num_threads == 3
    monkeypatch.delenv("TLJAX_DATA_THREADS")
    assert pipeline._read_options().num_threads == pipeline.default_data_threads()
