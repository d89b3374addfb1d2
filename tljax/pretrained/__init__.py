"""Pretrained checkpoints: readers, converters into tljax trees, strict loading, export.

    model, variables, info = load_pretrained("efficientnet_lite0", num_classes=10)
    variables = init_from_config({"source": "big_vision", "path": "ckpt.npz"}, init_vars)
"""

from tljax.pretrained.api import load_converted, load_pretrained, parse_spec
from tljax.pretrained.export import export_vit_to_hf
from tljax.pretrained.info import PretrainedInfo
from tljax.pretrained.loading import (
                                      CheckpointMismatchError,
                                      init_from_config,
                                      merge_pretrained,
                                      resample_posemb,
)
from tljax.pretrained.readers import OfflineError, UnsafeCheckpointError

__all__ = [
    "CheckpointMismatchError",
    "OfflineError",
    "PretrainedInfo",
    "UnsafeCheckpointError",
    "export_vit_to_hf",
    "init_from_config",
    "load_converted",
    "load_pretrained",
    "merge_pretrained",
    "parse_spec",
    "resample_posemb",
]
