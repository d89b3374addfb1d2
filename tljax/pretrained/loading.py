"""Strict merge of converted pretrained weights into a freshly initialised model.

`merge_pretrained` takes every variable from the checkpoint, except:
  * names matching a `dont_load` regex keep their initial value;
  * the classification head (`head/...`) keeps its (zero) initial value when its
    shape differs from the checkpoint's or either side lacks it;
  * a ViT `pos_embedding` whose grid differs is resampled to the new grid.
`read_init_checkpoint` also stacks an unscanned ViT checkpoint for a model built with
`scan=True` (and slices a scanned one for an unscanned model).
Anything else that is missing, unexpected or shape-mismatched is collected and
raised as one `CheckpointMismatchError` whose message is a table of all of them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tljax import tree
from tljax.errors import InputError
from tljax.models.model import HEAD

POSEMB_PATTERN = r"(^|/)pos_embedding$"


class CheckpointMismatchError(InputError):
    """The checkpoint does not fit the model; the message lists every offending name."""


def _strip_collection(name: str) -> str:
    """'params/head/kernel' -> 'head/kernel' (regexes are written without the collection)."""
    return name.split("/", 1)[1] if "/" in name else name


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return (tree.first_match(name, patterns) is not None
            or tree.first_match(_strip_collection(name), patterns) is not None)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)


def resample_posemb(posemb: np.ndarray, new_grid: tuple[int, int],
                    num_prefix_tokens: int = 0) -> np.ndarray:
    """Resamples a (1, prefix + h*w, D) position embedding to (1, prefix + H*W, D).

    The h x w grid part is zoomed with linear interpolation (scipy.ndimage.zoom,
    order=1, as big_vision does); the first `num_prefix_tokens` rows (a class slot)
    are kept as they are.
    """
    import scipy.ndimage

    prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
    old = math.isqrt(grid.shape[0])
    if old * old != grid.shape[0]:
        raise ValueError(f"Position embedding with {grid.shape[0]} grid tokens is not a square "
                         "grid; pass num_prefix_tokens for class/register slots.")
    grid = grid.reshape(old, old, -1)
    zoom = (new_grid[0] / old, new_grid[1] / old, 1)
    grid = scipy.ndimage.zoom(grid, zoom, order=1).reshape(1, new_grid[0] * new_grid[1], -1)
    return np.concatenate([prefix, grid.astype(posemb.dtype)], axis=1)


def _resample_to(loaded: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """Resample a pos_embedding, detecting a class slot from non-square token counts."""
    n_old, n_new = loaded.shape[1], target_shape[1]
    prefix = 0 if math.isqrt(n_new) ** 2 == n_new else 1
    if math.isqrt(n_old - prefix) ** 2 != n_old - prefix:
        raise ValueError(f"pos_embedding of {n_old} tokens: cannot tell the grid.")
    side = math.isqrt(n_new - prefix)
    return resample_posemb(np.asarray(loaded), (side, side), prefix)


def format_mismatches(rows: Sequence[tuple[str, str, str, str]]) -> str:
    """A fixed-width table: name | problem | checkpoint shape | model shape."""
    header = ("name", "problem", "checkpoint", "model")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    line = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
    sep = "-+-".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *[line(r) for r in rows]])


def merge_pretrained(init_variables: Mapping[str, Any], loaded_variables: Mapping[str, Any],
                     dont_load: Sequence[str] = ()) -> dict[str, Any]:
    """Variables shaped like `init_variables`, filled from `loaded_variables` (see module doc).

    Both trees are collections -> nested dicts ({'params': ..., 'batch_stats': ...}).
    `dont_load` regexes are searched in each name with and without its collection
    prefix ('head/kernel' and 'params/head/kernel'). Loaded values are cast to the
    initial dtype. Init leaves may be `jax.ShapeDtypeStruct`s where they get replaced.
    """
    init, loaded = tree.flatten(dict(init_variables)), tree.flatten(dict(loaded_variables))
    dont_load = list(dont_load)
    is_head = lambda n: re.search(HEAD, _strip_collection(n)) is not None
    merged, problems = {}, []
    for name, value in init.items():
        if _matches(name, dont_load):
            merged[name] = value
        elif name not in loaded:
            if is_head(name):
                merged[name] = value
            else:
                problems.append((name, "missing in checkpoint", "-", str(_shape(value))))
        else:
            new = loaded[name]
            if _shape(new) != _shape(value) and re.search(POSEMB_PATTERN, name):
                new = _resample_to(np.asarray(new), _shape(value))
            if _shape(new) == _shape(value):
                merged[name] = np.asarray(new, dtype=value.dtype)
            elif is_head(name):
                merged[name] = value
            else:
                problems.append((name, "shape mismatch", str(_shape(new)), str(_shape(value))))
    for name, value in loaded.items():
        if name not in init and not is_head(name) and not _matches(name, dont_load):
            problems.append((name, "unexpected (not in model)", str(_shape(value)), "-"))
    if problems:
        raise CheckpointMismatchError(
            f"The checkpoint does not match the model in {len(problems)} place(s). Excuse "
            "entries with `dont_load` regexes (they keep their initial values) or fix the "
            "model config:\n" + format_mismatches(sorted(problems)))
    return tree.unflatten(merged)


def read_init_checkpoint(init_cfg: Mapping[str, Any], init_variables: Mapping[str, Any]
                         ) -> tuple[dict[str, Any], list[str]]:
    """(converted checkpoint variables, dont_load regexes) for a config's `init` section.

    `init_cfg` (ConfigDict or dict): `source` (big_vision, vit_jax, timm, hf,
    torchvision, efficientnet_lite, resnetv2/bit, ge2e, tljax), `path` (file, directory, or
    for online users a hub id / gs:// URL), optional `dont_load` (regexes), `arch`
    (timm/torchvision architecture name), `step` (tljax checkpoints). `init_variables`
    may be shapes only (`jax.eval_shape`), so a run reads - or fails to reach - its
    checkpoint before compiling anything.
    """
    from tljax.pretrained.api import load_converted

    cfg = init_cfg.to_dict() if hasattr(init_cfg, "to_dict") else dict(init_cfg)
    unknown = set(cfg) - {"source", "path", "dont_load", "arch", "step"}
    if unknown or "source" not in cfg or "path" not in cfg:
        raise ValueError(f"init config needs `source` and `path` (optional: dont_load, arch, "
                         f"step); got keys {sorted(cfg)}.")
    hints = {}
    flat_init = tree.flatten(dict(init_variables))
    query = "params/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"
    scanned = "params/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"
    if query in flat_init:  # ViT heads cannot be read off timm weights; the model knows them
        hints["num_heads"] = int(_shape(flat_init[query])[1])
    elif scanned in flat_init:
        hints["num_heads"] = int(_shape(flat_init[scanned])[2])
    loaded, _ = load_converted(cfg["source"], str(cfg["path"]), arch=cfg.get("arch"),
                               step=cfg.get("step"), **hints)
    if "params" in loaded and (query in flat_init or scanned in flat_init):
        from tljax.models import vit

        is_scanned = any(n.startswith(vit.SCANNED) for n in tree.flatten(loaded["params"]))
        if scanned in flat_init and not is_scanned:
            loaded = {**loaded, "params": vit.scan_params(loaded["params"])}
        elif query in flat_init and is_scanned:
            loaded = {**loaded, "params": vit.unscan_params(loaded["params"])}
    return loaded, list(cfg.get("dont_load") or ())


def init_from_config(init_cfg: Mapping[str, Any], init_variables: Mapping[str, Any]
                     ) -> dict[str, Any]:
    """Loads `init_cfg.path` from `init_cfg.source` (see `read_init_checkpoint`) and
    merges it strictly into `init_variables`."""
    loaded, dont_load = read_init_checkpoint(init_cfg, init_variables)
    return merge_pretrained(init_variables, loaded, dont_load)
