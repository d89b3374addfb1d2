"""ViT checkpoints (big_vision, vit_jax, timm, HF transformers) <-> tljax `vit` variables.

tljax's ViT uses big_vision's names (see `tljax.models.vit`), so big_vision
Linen checkpoints need no renaming, except that a *scanned* encoder
(`Transformer/encoderblock/...` with a leading depth axis) is sliced into
`Transformer/encoderblock_{i}/...`.

vit_jax (pre-Linen) -> tljax, per block:
    MultiHeadDotProductAttention_1 -> MultiHeadDotProductAttention_0
    LayerNorm_2 -> LayerNorm_1, MlpBlock_3 -> MlpBlock_0
    Transformer/posembed_input/pos_embedding (1, 1+N, D) -> pos_embedding (1, N, D)
      with the class slot folded into the token: cls += pos[:, :1].

timm / HF -> tljax: see `_timm_names` and `_hf_names` for the per-tensor table.
Both add the position embedding after prepending the class token, so
cls_tljax = cls + pos[:, :1] and pos_tljax = pos[:, 1:]. Attention projections
(D, H*Dh) become Flax's (D, H, Dh) query/key/value and (H, Dh, D) out kernels;
timm's fused qkv rows are [q; k; v]. timm and HF use exact GELU, hence
`gelu_approximate=False`; HF's LayerNorm eps comes from config.json.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tljax import tree
from tljax.pretrained.common import SourceWeights, conv, conv_to_torch
from tljax.pretrained.info import PretrainedInfo

BIG_VISION_RANGE = (-1.0, 1.0)
# timm's standard ViT widths -> heads; used when the architecture name gives no hint.
HEADS_BY_WIDTH = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1280: 16}
TIMM_SIZE_HEADS = {"tiny": 3, "small": 6, "medium": 8, "base": 12, "large": 16, "huge": 16,
                   "giant": 16}
HF_GELU = {"gelu": False, "gelu_python": False, "gelu_new": True, "gelu_pytorch_tanh": True,
           "gelu_fast": True}


# ---------------------------------------------------------------------------------------------
# Model arguments from a tljax/big_vision tree.


def model_kwargs_from_params(flat: Mapping[str, np.ndarray], **overrides: Any) -> dict[str, Any]:
    """ViT keyword arguments read off the shapes of big_vision-named params (no 'params/')."""
    p, _, _, width = flat["embedding/kernel"].shape
    depth = len({m.group(1) for n in flat
                 if (m := re.match(r"Transformer/encoderblock_(\d+)/", n))})
    block = "Transformer/encoderblock_0"
    kwargs = dict(
        patch_size=(int(p), int(flat["embedding/kernel"].shape[1])),
        width=int(width), depth=depth,
        mlp_dim=int(flat[f"{block}/MlpBlock_0/Dense_0/kernel"].shape[-1]),
        num_heads=int(flat[f"{block}/MultiHeadDotProductAttention_0/query/kernel"].shape[1]),
        pool_type="tok" if "cls" in flat else ("map" if "MAPHead_0/probe" in flat else "gap"),
        representation_size=(int(flat["pre_logits/kernel"].shape[-1])
                              if "pre_logits/kernel" in flat else None),
    )
    return {**kwargs, **overrides}


def head_size(flat: Mapping[str, np.ndarray]) -> int | None:
    """Outputs of the checkpoint's `head` (no 'params/' prefix), None without one."""
    return int(flat["head/bias"].shape[0]) if "head/bias" in flat else None


def _resolution(flat: Mapping[str, np.ndarray]) -> int:
    grid = math.isqrt(flat["pos_embedding"].shape[1])
    return int(grid * flat["embedding/kernel"].shape[0])


def _params_info(source: str, flat: dict[str, np.ndarray], **overrides: Any
                 ) -> tuple[dict[str, Any], PretrainedInfo]:
    kwargs = model_kwargs_from_params(flat, **overrides)
    info = PretrainedInfo(source=source, model_name="vit", model_kwargs=kwargs,
                          num_classes=head_size(flat), resolution=_resolution(flat),
                          value_range=BIG_VISION_RANGE)
    return {"params": tree.unflatten(flat)}, info


# ---------------------------------------------------------------------------------------------
# big_vision and vit_jax (.npz, Flax layouts).


def unscan(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`Transformer/encoderblock/X` with a leading depth axis -> `encoderblock_{i}/X` slices."""
    out = {}
    for name, value in flat.items():
        if name.startswith("Transformer/encoderblock/"):
            rest = name[len("Transformer/encoderblock/"):]
            for i in range(value.shape[0]):
                out[f"Transformer/encoderblock_{i}/{rest}"] = value[i]
        else:
            out[name] = value
    return out


def _strip_params_prefix(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    # Some big_vision checkpoints store the whole train state: keep the params only.
    if any(n.startswith("params/") for n in flat):
        return {n[len("params/"):]: v for n, v in flat.items() if n.startswith("params/")}
    return dict(flat)


def convert_big_vision(weights: Mapping[str, np.ndarray]) -> tuple[dict[str, Any],
                                                                   PretrainedInfo]:
    """A big_vision Linen ViT .npz (scanned or not) -> (tljax variables, PretrainedInfo)."""
    flat = unscan(_strip_params_prefix(weights))
    if "Transformer/posembed_input/pos_embedding" in flat:
        raise ValueError("This is a vit_jax (pre-Linen) checkpoint: use the 'vit_jax:' source.")
    return _params_info("big_vision", flat)


VIT_JAX_RENAMES = (
    ("/MultiHeadDotProductAttention_1/", "/MultiHeadDotProductAttention_0/"),
    ("/LayerNorm_2/", "/LayerNorm_1/"),
    ("/MlpBlock_3/", "/MlpBlock_0/"),
)


def convert_vit_jax(weights: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], PretrainedInfo]:
    """A vit_jax (gs://vit_models, pre-Linen) ViT .npz -> (tljax variables, PretrainedInfo)."""
    flat = dict(weights)
    if "embedding/kernel" not in flat:
        raise ValueError("No 'embedding/kernel': ResNet-hybrid vit_jax checkpoints are not "
                         "supported, only plain ViTs.")
    out = {}
    for name, value in flat.items():
        for old, new in VIT_JAX_RENAMES:
            name = name.replace(old, new)
        out[name] = value
    pos = out.pop("Transformer/posembed_input/pos_embedding")
    if "cls" in out:  # fold the class slot of the position embedding into the token
        out["cls"] = out["cls"] + pos[:, :1]
        pos = pos[:, 1:]
    out["pos_embedding"] = pos
    return _params_info("vit_jax", out)


# ---------------------------------------------------------------------------------------------
# PyTorch layouts (timm, HF). Each table row: (torch name, tljax name, transform).
# Transforms: 'id', 'linear' (transpose), 'conv' (OIHW -> HWIO), 'qkv' ((H*Dh, D) -> (D, H, Dh)),
# 'qkv_bias' ((H*Dh,) -> (H, Dh)), 'out' ((D, H*Dh) -> (H, Dh, D)).


def _to_tljax(x: np.ndarray, kind: str, heads: int) -> np.ndarray:
    if kind == "id":
        return x
    if kind == "linear":
        return np.ascontiguousarray(x.T)
    if kind == "conv":
        return conv(x)
    if kind == "qkv":
        return np.ascontiguousarray(x.T.reshape(x.shape[1], heads, -1))
    if kind == "qkv_bias":
        return x.reshape(heads, -1)
    if kind == "out":
        return np.ascontiguousarray(x.T.reshape(heads, -1, x.shape[0]))
    raise ValueError(kind)


def _to_torch(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "id":
        return x
    if kind == "linear":
        return np.ascontiguousarray(x.T)
    if kind == "conv":
        return conv_to_torch(x)
    if kind == "qkv":  # (D, H, Dh) -> (H*Dh, D)
        return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)
    if kind == "qkv_bias":
        return x.reshape(-1)
    if kind == "out":  # (H, Dh, D) -> (D, H*Dh)
        return np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)
    raise ValueError(kind)


def _block_names(i: int) -> Iterator[tuple[str, str]]:
    b = f"Transformer/encoderblock_{i}"
    yield f"{b}/LayerNorm_0", "norm1"
    yield f"{b}/MultiHeadDotProductAttention_0", "attn"
    yield f"{b}/LayerNorm_1", "norm2"
    yield f"{b}/MlpBlock_0", "mlp"


def _hf_names(depth: int, prefix: str = "vit.") -> Iterator[tuple[str, str, str]]:
    """(HF name, tljax name, transform) for every tensor except cls/pos (handled apart)."""
    e = f"{prefix}embeddings.patch_embeddings.projection"
    yield f"{e}.weight", "embedding/kernel", "conv"
    yield f"{e}.bias", "embedding/bias", "id"
    for i in range(depth):
        hf, b = f"{prefix}encoder.layer.{i}", f"Transformer/encoderblock_{i}"
        for ln, tl in (("layernorm_before", "LayerNorm_0"), ("layernorm_after", "LayerNorm_1")):
            yield f"{hf}.{ln}.weight", f"{b}/{tl}/scale", "id"
            yield f"{hf}.{ln}.bias", f"{b}/{tl}/bias", "id"
        attn = f"{b}/MultiHeadDotProductAttention_0"
        for proj in ("query", "key", "value"):
            yield f"{hf}.attention.attention.{proj}.weight", f"{attn}/{proj}/kernel", "qkv"
            yield f"{hf}.attention.attention.{proj}.bias", f"{attn}/{proj}/bias", "qkv_bias"
        yield f"{hf}.attention.output.dense.weight", f"{attn}/out/kernel", "out"
        yield f"{hf}.attention.output.dense.bias", f"{attn}/out/bias", "id"
        for hf_dense, tl in (("intermediate.dense", "Dense_0"), ("output.dense", "Dense_1")):
            yield f"{hf}.{hf_dense}.weight", f"{b}/MlpBlock_0/{tl}/kernel", "linear"
            yield f"{hf}.{hf_dense}.bias", f"{b}/MlpBlock_0/{tl}/bias", "id"
    yield f"{prefix}layernorm.weight", "Transformer/encoder_norm/scale", "id"
    yield f"{prefix}layernorm.bias", "Transformer/encoder_norm/bias", "id"


def _timm_names(depth: int) -> Iterator[tuple[str, str, str]]:
    """(timm name, tljax name, transform); the fused qkv is split by the caller."""
    yield "patch_embed.proj.weight", "embedding/kernel", "conv"
    yield "patch_embed.proj.bias", "embedding/bias", "id"
    for i in range(depth):
        t, b = f"blocks.{i}", f"Transformer/encoderblock_{i}"
        for ln, tl in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_1")):
            yield f"{t}.{ln}.weight", f"{b}/{tl}/scale", "id"
            yield f"{t}.{ln}.bias", f"{b}/{tl}/bias", "id"
        yield f"{t}.attn.proj.weight", f"{b}/MultiHeadDotProductAttention_0/out/kernel", "out"
        yield f"{t}.attn.proj.bias", f"{b}/MultiHeadDotProductAttention_0/out/bias", "id"
        for fc, tl in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            yield f"{t}.mlp.{fc}.weight", f"{b}/MlpBlock_0/{tl}/kernel", "linear"
            yield f"{t}.mlp.{fc}.bias", f"{b}/MlpBlock_0/{tl}/bias", "id"
    yield "norm.weight", "Transformer/encoder_norm/scale", "id"
    yield "norm.bias", "Transformer/encoder_norm/bias", "id"


def _class_token_and_pos(cls: np.ndarray, pos: np.ndarray, out: dict[str, np.ndarray]) -> None:
    """timm/HF add `pos` after prepending the token: fold its class row into `cls`."""
    out["cls"] = cls + pos[:, :1]
    out["pos_embedding"] = pos[:, 1:]


def timm_num_heads(model_name: str | None, width: int) -> int:
    """Heads of a timm ViT from its name ('vit_tiny_patch16_224' -> 3) or, failing that, width."""
    if model_name:
        for size, heads in TIMM_SIZE_HEADS.items():
            if f"_{size}_" in f"_{model_name}_".replace("patch", "_patch"):
                return heads
    if width in HEADS_BY_WIDTH:
        return HEADS_BY_WIDTH[width]
    raise ValueError(f"Cannot tell the number of attention heads of a width-{width} timm ViT: "
                     "pass the timm architecture name, e.g. 'timm:vit_small_patch16_224:PATH'.")


def convert_timm(state_dict: Mapping[str, np.ndarray], model_name: str | None = None,
                 num_heads: int | None = None) -> tuple[dict[str, Any], PretrainedInfo]:
    """A timm VisionTransformer state dict (class token, pre-norm) -> tljax variables.

    Supported: timm's standard ViT with a class token and `global_pool='token'`.
    Register tokens, `fc_norm` (avg pooling), `no_embed_class` and layer scale have no
    counterpart in tljax's ViT and raise.
    """
    src = SourceWeights(state_dict, "timm ViT state dict")
    names = set(src.names())
    unsupported = [n for n in ("reg_token", "fc_norm.weight", "blocks.0.ls1.gamma") if n in names]
    if unsupported or "cls_token" not in names:
        raise ValueError(f"timm ViT variant not supported by tljax's ViT: found {unsupported}"
                         f"{'' if 'cls_token' in names else ', no cls_token'}; "
                         "only class-token ViTs (global_pool='token') convert.")
    width = src["patch_embed.proj.weight"].shape[0]
    heads = num_heads or timm_num_heads(model_name, width)
    depth = len({int(m.group(1)) for n in names if (m := re.match(r"blocks\.(\d+)\.", n))})
    out: dict[str, np.ndarray] = {}
    for torch_name, name, kind in _timm_names(depth):
        out[name] = _to_tljax(src[torch_name], kind, heads)
    for i in range(depth):
        attn = f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0"
        qkv_w = np.split(src[f"blocks.{i}.attn.qkv.weight"], 3, axis=0)
        has_bias = f"blocks.{i}.attn.qkv.bias" in names
        qkv_b = (np.split(src[f"blocks.{i}.attn.qkv.bias"], 3) if has_bias
                 else [np.zeros(width, np.float32)] * 3)
        for proj, w, b in zip(("query", "key", "value"), qkv_w, qkv_b, strict=True):
            out[f"{attn}/{proj}/kernel"] = _to_tljax(w, "qkv", heads)
            out[f"{attn}/{proj}/bias"] = _to_tljax(b, "qkv_bias", heads)
    _class_token_and_pos(src["cls_token"], src["pos_embed"], out)
    if "head.weight" in names:
        out["head/kernel"] = _to_tljax(src["head.weight"], "linear", heads)
        out["head/bias"] = src["head.bias"]
    src.check_all_used()
    variables, info = _params_info("timm", out, num_heads=heads, gelu_approximate=False,
                                   layernorm_eps=1e-6)
    return variables, info


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """config.json of an HF model directory."""
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"No config.json in {path}: an HF model directory needs it "
                                "(save_pretrained writes it).")
    return json.loads(config_file.read_text())


def _hf_normalisation(path: str | Path | None) -> dict[str, Any]:
    """Input normalisation from preprocessor_config.json; HF ViTs default to mean = std = 0.5."""
    file = Path(path) / "preprocessor_config.json" if path else None
    if file and file.exists():
        cfg = json.loads(file.read_text())
        if "image_mean" in cfg and "image_std" in cfg:
            mean, std = tuple(cfg["image_mean"]), tuple(cfg["image_std"])
            if mean == (0.5, 0.5, 0.5) and std == (0.5, 0.5, 0.5):
                return {"value_range": (-1.0, 1.0)}
            return {"mean": mean, "std": std}
    return {"value_range": (-1.0, 1.0)}


def convert_hf(state_dict: Mapping[str, np.ndarray], config: Mapping[str, Any],
               path: str | Path | None = None) -> tuple[dict[str, Any], PretrainedInfo]:
    """HF transformers `ViTForImageClassification` / `ViTModel` weights -> tljax variables.

    `config` is the model's config.json. A `ViTModel` pooler (dense + tanh) is
    dropped, as `ViTForImageClassification.from_pretrained` does; `classifier`
    becomes `head`.
    """
    if config.get("model_type") != "vit":
        raise ValueError(f"model_type={config.get('model_type')!r}: expected 'vit'.")
    act = config.get("hidden_act", "gelu")
    if act not in HF_GELU:
        raise ValueError(f"hidden_act={act!r} has no tljax ViT counterpart ({sorted(HF_GELU)}).")
    src = SourceWeights(state_dict, "HF ViT weights")
    prefix = "vit." if "vit.embeddings.cls_token" in src else ""
    heads, depth = int(config["num_attention_heads"]), int(config["num_hidden_layers"])
    out: dict[str, np.ndarray] = {}
    for hf_name, name, kind in _hf_names(depth, prefix):
        if hf_name.endswith(".bias") and kind == "qkv_bias" and hf_name not in src:
            out[name] = np.zeros((heads, int(config["hidden_size"]) // heads), np.float32)
            continue  # qkv_bias=False
        out[name] = _to_tljax(src[hf_name], kind, heads)
    _class_token_and_pos(src[f"{prefix}embeddings.cls_token"],
                         src[f"{prefix}embeddings.position_embeddings"], out)
    if "classifier.weight" in src:
        out["head/kernel"] = _to_tljax(src["classifier.weight"], "linear", heads)
        out["head/bias"] = src["classifier.bias"]
    src.check_all_used(ignore=[r"pooler\."])
    variables, info = _params_info(
        "hf", out, num_heads=heads, gelu_approximate=HF_GELU[act],
        layernorm_eps=float(config.get("layer_norm_eps", 1e-12)))
    for key, value in _hf_normalisation(path).items():
        setattr(info, key, value)
    return variables, info


# ---------------------------------------------------------------------------------------------
# Export: tljax -> HF.


def to_hf_state_dict(params: Mapping[str, Any], model_kwargs: Mapping[str, Any]
                     ) -> dict[str, np.ndarray]:
    """tljax ViT params -> HF `ViTForImageClassification` tensors (numpy, torch layout)."""
    if model_kwargs.get("pool_type", "tok") != "tok" or model_kwargs.get("representation_size"):
        raise ValueError("Only class-token ViTs without pre_logits (pool_type='tok', "
                         "representation_size=None) have an HF ViTForImageClassification layout.")
    flat = {n: np.asarray(v, np.float32) for n, v in tree.flatten(dict(params)).items()}
    flat = {n[len("params/"):] if n.startswith("params/") else n: v for n, v in flat.items()}
    depth = int(model_kwargs.get("depth", 12))
    out = {hf: _to_torch(flat[name], kind) for hf, name, kind in _hf_names(depth)}
    pos = flat["pos_embedding"]
    # HF adds pos[:, 0] to the class token; a zero row keeps cls + pos0 == tljax's cls.
    out["vit.embeddings.position_embeddings"] = np.concatenate(
        [np.zeros_like(pos[:, :1]), pos], axis=1)
    out["vit.embeddings.cls_token"] = flat["cls"]
    if "head/kernel" in flat:
        out["classifier.weight"] = _to_torch(flat["head/kernel"], "linear")
        out["classifier.bias"] = flat["head/bias"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def hf_config(params: Mapping[str, Any], model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """An HF ViTConfig dict describing tljax ViT `params` built with `model_kwargs`."""
    flat = {n[len("params/"):] if n.startswith("params/") else n: v
            for n, v in tree.flatten(dict(params)).items()}
    kw = model_kwargs_from_params(flat, **{k: v for k, v in model_kwargs.items()
                                           if k in ("num_heads",)})
    num_classes = head_size(flat)
    gelu_approximate = model_kwargs.get("gelu_approximate", True)
    config = {
        "model_type": "vit",
        "architectures": ["ViTForImageClassification"],
        "hidden_size": kw["width"],
        "num_hidden_layers": kw["depth"],
        "num_attention_heads": kw["num_heads"],
        "intermediate_size": kw["mlp_dim"],
        "hidden_act": "gelu_pytorch_tanh" if gelu_approximate else "gelu",
        "layer_norm_eps": float(model_kwargs.get("layernorm_eps", 1e-6)),
        "image_size": _resolution(flat),
        "patch_size": kw["patch_size"][0],
        "num_channels": int(flat["embedding/kernel"].shape[2]),
        "qkv_bias": True,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    if num_classes:
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_classes)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(num_classes)}
    return config
