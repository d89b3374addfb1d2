"""Common corruptions: every one is deterministic given its seed, changes the image, grows with
severity, and keeps the image's shape and type; as a pp op it is seeded by the pipeline."""

from __future__ import annotations

import numpy as np
import pytest

from tljax import data
from tljax.data import corruptions


@pytest.fixture(scope="module")
def photo():
    """A real photo (scikit-image's astronaut), 64 x 64 RGB, and a gray 28 x 28 crop."""
    skimage = pytest.importorskip("skimage")
    from PIL import Image

    image = Image.fromarray(skimage.data.astronaut()).resize((64, 64), Image.BILINEAR)
    rgb = np.asarray(image)
    gray = np.asarray(image.convert("L").resize((28, 28)))[..., None]
    return rgb, gray


def _change(a, b):
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.mark.parametrize("name", list(corruptions.CORRUPTIONS))
def test_each_corruption(name, photo):
    for image in photo:
        outs = [corruptions.apply(image, name, s, np.random.default_rng(7)) for s in (1, 5)]
        again = corruptions.apply(image, name, 5, np.random.default_rng(7))
        assert all(o.dtype == np.uint8 and o.shape == image.shape for o in outs)
        assert np.array_equal(outs[1], again), "not deterministic given its seed"
        if name == "saturate" and image.shape[-1] == 1:
            continue  # a gray image has no saturation
        assert _change(outs[0], image) > 0, "severity 1 leaves the image unchanged"
        assert _change(outs[1], image) > _change(outs[0], image), "severity 5 <= severity 1"


def test_families_cover_at_least_ten_types():
    names = [n for family in corruptions.FAMILIES.values() for n in family]
    assert sorted(names) == sorted(corruptions.CORRUPTIONS) and len(names) >= 10


def test_corrupt_op_in_a_pipeline(fashion_mnist_dir):
    pp = "decode|corrupt('gaussian_noise', 4)|rgb|value_range(0, 1)"
    clean = data.eval_batches(dataset="fashion_mnist", split="test[:8]", batch_size=8,
                              pp="decode|rgb|value_range(0, 1)", data_dir=fashion_mnist_dir)
    noisy = [next(data.eval_batches(dataset="fashion_mnist", split="test[:8]", batch_size=8,
                                    pp=pp, data_dir=fashion_mnist_dir)) for _ in range(2)]
    assert np.array_equal(noisy[0]["image"], noisy[1]["image"])  # seeded per position
    assert not np.array_equal(next(clean)["image"], noisy[0]["image"])
    with pytest.raises(ValueError, match="closest valid key: gaussian_noise"):
        data.Preprocess("corrupt('gausian_noise', 3)")
    with pytest.raises(ValueError, match="severity must be 1..5"):
        data.Preprocess("corrupt('fog', 6)")


def test_randaugment_is_seeded_and_keeps_shapes(photo):
    for image in photo:
        pp = data.Preprocess("randaugment(2, 9)")
        outs = [pp.example({"image": image}, np.random.default_rng(s))["image"] for s in (0, 0, 1)]
        assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
        assert np.array_equal(outs[0], outs[1])
        changed = [not np.array_equal(pp.example({"image": image}, np.random.default_rng(s))[
            "image"], image) for s in range(10)]
        assert sum(changed) >= 8  # identity is 1 of 14 ops, drawn twice
    assert data.Preprocess("randaugment(2, 9)").is_random
    with pytest.raises(ValueError, match="uint8"):
        data.Preprocess("randaugment()").example({"image": np.zeros((4, 4, 3), np.float32)},
                                                  np.random.default_rng(0))
