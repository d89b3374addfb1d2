"""ViT converters (HF, timm, big_vision, vit_jax), strict loading, readers, export, tools.

Parity tests initialise the reference randomly, convert it and compare logits on
the same random input: max abs diff < 1e-4 (float32); the measured value is printed.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.test_models_vision import randomize  # noqa: E402
from tljax import tree  # noqa: E402
from tljax.models import classifier  # noqa: E402
from tljax.pretrained import (  # noqa: E402
    CheckpointMismatchError,
    OfflineError,
    UnsafeCheckpointError,
    export_vit_to_hf,
    init_from_config,
    load_pretrained,
    merge_pretrained,
    readers,
    resample_posemb,
)

TOL = 1e-4


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def max_diff(name: str, ours, theirs) -> float:
    diff = float(np.abs(np.asarray(ours) - np.asarray(theirs)).max())
    print(f"{name}: max |logit diff| = {diff:.2e} (logit scale {np.abs(theirs).max():.2f})")
    return diff


# ---------------------------------------------------------------------------------------------
# HF transformers and timm ViTs.

HF_CONFIGS = {
    "p8_d2_w64_eps1e-12": dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=128,
                               layer_norm_eps=1e-12, num_labels=5),
    "p16_d3_w96_eps1e-6_noqkvbias": dict(image_size=48, patch_size=16, hidden_size=96,
                                         num_hidden_layers=3, num_attention_heads=3,
                                         intermediate_size=160, layer_norm_eps=1e-6,
                                         qkv_bias=False, num_labels=7),
}


def hf_vit(tmp_path, **config):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ref = randomize(transformers.ViTForImageClassification(transformers.ViTConfig(**config)))
    ref.save_pretrained(tmp_path)
    return ref


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hf_vit_parity(tmp_path, name):
    config = HF_CONFIGS[name]
    ref = hf_vit(tmp_path, **config)
    model, variables, info = load_pretrained(f"hf:{tmp_path}")
    assert info.model_kwargs["layernorm_eps"] == config["layer_norm_eps"]
    assert info.model_kwargs["gelu_approximate"] is False
    assert info.resolution == config["image_size"] and info.value_range == (-1.0, 1.0)
    x = images(2, config["image_size"])
    with torch.no_grad():
        theirs = ref(pixel_values=nchw(x)).logits.numpy()
    assert max_diff(f"HF ViT {name}", model.apply(variables, x), theirs) < TOL


def timm_vit(**kwargs):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                                       patch_size=8, depth=2, num_classes=5, **kwargs))


def test_timm_vit_parity(tmp_path):
    from safetensors.torch import save_file

    ref = timm_vit()
    save_file(ref.state_dict(), str(tmp_path / "model.safetensors"))
    model, variables, info = load_pretrained(
        f"timm:vit_tiny_patch16_224:{tmp_path / 'model.safetensors'}")
    assert info.model_kwargs["num_heads"] == 3 and info.model_kwargs["depth"] == 2
    x = images(2, 32)
    with torch.no_grad():
        theirs = ref(nchw(x)).numpy()
    assert max_diff("timm ViT (tiny, d2, p8)", model.apply(variables, x), theirs) < TOL
    # The same weights as a PyTorch .pth, architecture inferred (width 192 -> 3 heads).
    torch.save(ref.state_dict(), tmp_path / "model.pth")
    _, from_pth, _ = load_pretrained(f"timm:{tmp_path / 'model.pth'}")
    jax.tree.map(np.testing.assert_array_equal, from_pth, variables)


def test_timm_unsupported_variant_is_refused(tmp_path):
    from safetensors.torch import save_file

    ref = timm_vit(global_pool="avg", class_token=False)
    save_file(ref.state_dict(), str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="not supported"):
        load_pretrained(f"timm:{tmp_path / 'model.safetensors'}")


# ---------------------------------------------------------------------------------------------
# big_vision and vit_jax .npz layouts (written here from a converted tree).


@pytest.fixture(scope="module")
def vit_tree(tmp_path_factory):
    """A converted timm ViT: (flat params without 'params/', model kwargs)."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("timm") / "model.safetensors"
    save_file(timm_vit().state_dict(), str(path))
    _, variables, info = load_pretrained(f"timm:vit_tiny_patch16_224:{path}")
    return tree.flatten(variables["params"]), info.model_kwargs


def _assert_same_params(variables, flat, atol=1e-7):
    got = tree.flatten(variables["params"])
    assert set(got) == set(flat)
    for name in flat:
        np.testing.assert_allclose(got[name], flat[name], rtol=1e-6, atol=atol, err_msg=name)


@pytest.mark.parametrize("scanned", [False, True], ids=["unscanned", "scanned"])
def test_big_vision_npz(tmp_path, vit_tree, scanned):
    flat, kwargs = vit_tree
    npz = dict(flat)
    if scanned:  # big_vision's scan layout: one stacked entry per block parameter
        blocks = {n: v for n, v in npz.items() if n.startswith("Transformer/encoderblock_")}
        for name in blocks:
            del npz[name]
        for name in {n.split("/", 2)[2] for n in blocks}:
            npz[f"Transformer/encoderblock/{name}"] = np.stack(
                [blocks[f"Transformer/encoderblock_{i}/{name}"] for i in range(kwargs["depth"])])
    np.savez(tmp_path / "ckpt.npz", **npz)
    model, variables, info = load_pretrained(f"big_vision:{tmp_path / 'ckpt.npz'}")
    _assert_same_params(variables, flat)
    assert info.model_kwargs["depth"] == kwargs["depth"] and info.resolution == 32
    assert model.backbone.gelu_approximate  # big_vision's nn.gelu default
    assert model.apply(variables, images(1, 32)).shape == (1, 5)


def test_vit_jax_npz(tmp_path, vit_tree):
    flat, _ = vit_tree
    slot = np.random.default_rng(0).standard_normal(flat["cls"].shape).astype(np.float32)
    npz = {}
    for name, value in flat.items():
        for new, old in (("MultiHeadDotProductAttention_0", "MultiHeadDotProductAttention_1"),
                         ("LayerNorm_1", "LayerNorm_2"), ("MlpBlock_0", "MlpBlock_3")):
            if name.startswith("Transformer/encoderblock_"):
                name = name.replace(f"/{new}/", f"/{old}/")
        npz[name] = value
    # vit_jax keeps a class slot in the position embedding and adds it to the token.
    npz["Transformer/posembed_input/pos_embedding"] = np.concatenate(
        [slot, npz.pop("pos_embedding")], axis=1)
    npz["cls"] = flat["cls"] - slot
    np.savez(tmp_path / "vit_jax.npz", **npz)
    _, variables, info = load_pretrained(f"vit_jax:{tmp_path / 'vit_jax.npz'}")
    _assert_same_params(variables, flat, atol=1e-6)  # cls: (cls - slot) + slot rounds
    assert info.source == "vit_jax"


# ---------------------------------------------------------------------------------------------
# Strict merging, position-embedding resampling, init_from_config.


def small_vit(**kwargs):
    defaults = dict(num_classes=5, patch_size=(8, 8), width=32, depth=1, mlp_dim=64, num_heads=2)
    return classifier("vit", **{**defaults, **kwargs})


def init(model, size=32, seed=0):
    """Variables shaped by `model` (eval_shape: no compilation), random, zero head."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    rng = np.random.default_rng(seed)
    return tree.map_with_names(
        lambda n, s: (np.zeros(s.shape, s.dtype) if "/head/" in f"/{n}"
                      else 0.1 * rng.standard_normal(s.shape).astype(s.dtype)), shapes)


def test_merge_reports_all_problems_in_one_error():
    variables = init(small_vit())
    flat = tree.flatten(variables)
    broken = dict(flat)
    del broken["params/Transformer/encoder_norm/scale"]  # missing
    broken["params/extra/kernel"] = np.zeros((3, 3))  # unexpected
    broken["params/embedding/bias"] = np.zeros((31,))  # wrong shape
    with pytest.raises(CheckpointMismatchError) as err:
        merge_pretrained(variables, tree.unflatten(broken))
    message = str(err.value)
    print(message)
    assert "3 place(s)" in message
    assert "params/Transformer/encoder_norm/scale" in message and "missing" in message
    assert "params/extra/kernel" in message and "(3, 3)" in message
    assert "params/embedding/bias" in message and "(31,)" in message and "(32,)" in message
    # dont_load excuses all three; excused entries keep their initial values.
    merged = merge_pretrained(variables, tree.unflatten(broken),
                              dont_load=["encoder_norm/scale", "^extra/", "^embedding/bias$"])
    np.testing.assert_array_equal(merged["params"]["embedding"]["bias"],
                                  variables["params"]["embedding"]["bias"])


def test_merge_replaces_head_and_resamples_pos_embedding():
    pretrained = tree.flatten(init(small_vit(num_classes=5)))
    pretrained = {n: np.asarray(v) + 1.0 for n, v in pretrained.items()}  # recognisable values
    target = init(small_vit(num_classes=3), size=48)  # 4x4 -> 6x6 grid, new head
    merged = merge_pretrained(target, tree.unflatten(pretrained))
    params = merged["params"]
    assert params["pos_embedding"].shape == (1, 36, 32)
    assert params["head"]["kernel"].shape == (32, 3) and not np.asarray(
        params["head"]["kernel"]).any()
    np.testing.assert_array_equal(params["cls"], pretrained["params/cls"])


def test_resample_posemb_keeps_class_slot():
    posemb = np.random.default_rng(0).standard_normal((1, 1 + 16, 8)).astype(np.float32)
    out = resample_posemb(posemb, (6, 6), num_prefix_tokens=1)
    assert out.shape == (1, 37, 8)
    np.testing.assert_array_equal(out[:, 0], posemb[:, 0])
    # Corners of a linear zoom coincide with the old corners.
    grid_old, grid_new = posemb[0, 1:].reshape(4, 4, 8), out[0, 1:].reshape(6, 6, 8)
    np.testing.assert_allclose(grid_new[0, 0], grid_old[0, 0], rtol=1e-6)
    np.testing.assert_allclose(grid_new[-1, -1], grid_old[-1, -1], rtol=1e-6)


def test_init_from_config_timm(tmp_path):
    ml_collections = pytest.importorskip("ml_collections")
    from safetensors.torch import save_file

    save_file(timm_vit().state_dict(), str(tmp_path / "model.safetensors"))
    model = classifier("vit", num_classes=10, patch_size=(8, 8), width=192, depth=2,
                        mlp_dim=768, num_heads=3, gelu_approximate=False)
    target = init(model, size=48)
    cfg = ml_collections.ConfigDict({"source": "timm", "path": str(tmp_path / "model.safetensors"),
                                     "dont_load": []})
    merged = init_from_config(cfg, target)
    assert merged["params"]["pos_embedding"].shape == (1, 36, 192)
    assert merged["params"]["head"]["kernel"].shape == (192, 10)
    assert model.apply(merged, images(1, 48)).shape == (1, 10)


def test_load_pretrained_num_classes_replaces_head(tmp_path):
    hf_vit(tmp_path, **HF_CONFIGS["p8_d2_w64_eps1e-12"])
    model, variables, info = load_pretrained(f"hf:{tmp_path}", num_classes=2)
    assert model.head.num_outputs == 2 and info.num_classes == 2
    assert not np.asarray(variables["params"]["head"]["kernel"]).any()
    assert np.asarray(model.apply(variables, images(1, 32))).shape == (1, 2)


# ---------------------------------------------------------------------------------------------
# Readers: refusing unsafe files, failing fast offline.


class _Payload:
    """Unpickling this runs `Path(marker).write_text('pwned')`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "pwned"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker.txt"
    evil = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "payload": _Payload(str(marker))}, evil)
    with pytest.raises(UnsafeCheckpointError, match="Refusing"):
        readers.read_weights(evil)
    with pytest.raises(UnsafeCheckpointError):
        load_pretrained(f"torchvision:resnet18:{evil}")
    assert not marker.exists()
    # The payload is real: an unrestricted torch.load would have run it.
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "pwned"


def test_npz_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(UnsafeCheckpointError):
        readers.read_npz(tmp_path / "obj.npz")


@pytest.mark.parametrize("spec,alternative", [
    ("hf:google/vit-base-patch16-224", "hf:/path"),
    ("timm:vit_base_patch16_224.augreg_in21k", "timm:vit_base_patch16_224:/path"),
    ("big_vision:gs://big_vision/vit_b16.npz", "big_vision:/path"),
])
def test_online_sources_fail_fast_offline(spec, alternative, monkeypatch):
    try:
        readers.check_online("huggingface.co", timeout=2)
        readers.check_online("storage.googleapis.com", timeout=2)
        monkeypatch.setenv("TLJAX_OFFLINE", "1")  # online machine: simulate offline
    except OfflineError:
        pass
    start = time.monotonic()
    with pytest.raises(OfflineError) as err:
        load_pretrained(spec)
    elapsed = time.monotonic() - start
    print(f"{spec}: failed in {elapsed:.2f} s: {err.value}")
    assert elapsed < 10
    assert alternative in str(err.value)


def test_torch_missing_message(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch":
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pth")
    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(ImportError, match="pip install torch"):
        readers.read_weights(tmp_path / "w.pth")


# ---------------------------------------------------------------------------------------------
# Export back to HF, and the tools.


def test_export_vit_to_hf_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    kwargs = dict(num_classes=4, patch_size=(8, 8), width=48, depth=2, mlp_dim=96, num_heads=3)
    model = classifier("vit", **kwargs)
    variables = init(model)
    variables["params"]["head"]["kernel"] += 0.1  # a non-zero head checks the classifier too
    out = export_vit_to_hf(variables, kwargs, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_act"] == "gelu_pytorch_tanh"  # tljax default gelu_approximate=True
    ref = transformers.ViTForImageClassification.from_pretrained(out).eval()
    x = images(2, 32)
    with torch.no_grad():
        theirs = ref(pixel_values=nchw(x)).logits.numpy()
    assert max_diff("export tljax ViT -> HF", model.apply(variables, x), theirs) < TOL
    _, back, _ = load_pretrained(f"hf:{out}")
    _assert_same_params(back, tree.flatten(variables["params"]))


def test_convert_checkpoint_and_inspect_tools(tmp_path, capsys):
    from tools import convert_checkpoint, inspect_params

    hf_vit(tmp_path / "hf", **HF_CONFIGS["p8_d2_w64_eps1e-12"])
    out = tmp_path / "converted"
    assert convert_checkpoint.main([f"--source=hf:{tmp_path / 'hf'}", f"--output={out}"]) == 0
    model, variables, info = load_pretrained(f"tljax:{out}")
    _, original, original_info = load_pretrained(f"hf:{tmp_path / 'hf'}")
    assert info.model_kwargs["layernorm_eps"] == original_info.model_kwargs["layernorm_eps"]
    x = images(1, 32)
    np.testing.assert_allclose(model.apply(variables, x), model.apply(original, x), atol=1e-6)

    text = inspect_params.describe(variables)
    total = sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(variables))
    assert f"total: {total:,}" in text and "MultiHeadDotProductAttention_0/" in text
    assert inspect_params.main([f"tljax:{out}", "--depth=2"]) == 0
    printed = capsys.readouterr().out
    assert "Transformer/" in printed and "encoderblock_0/" not in printed  # folded below depth 2
    assert os.path.exists(out / "metadata.json")


def test_hf_bert_directory_is_delegated(tmp_path):
    """model_type 'bert' in config.json goes to tljax.pretrained.bert.load_hf_bert."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tljax.pretrained.bert")
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64)
    transformers.BertModel(config).save_pretrained(tmp_path)
    model, _, info = load_pretrained(f"hf:{tmp_path}", num_classes=2)
    assert info.model_name == "bert" and model.head.num_outputs == 2
