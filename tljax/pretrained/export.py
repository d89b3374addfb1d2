"""Export fine-tuned tljax weights for PyTorch users.

`export_vit_to_hf` writes `model.safetensors` + `config.json` that
`transformers.ViTForImageClassification.from_pretrained(out_dir)` loads as is.
The tensor mapping is the inverse of `tljax.pretrained.vit.convert_hf`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tljax.pretrained import vit


def export_vit_to_hf(variables: Mapping[str, Any], model_kwargs: Mapping[str, Any],
                     out_dir: str | os.PathLike) -> Path:
    """Writes tljax ViT `variables` (built with `model_kwargs`) as an HF ViT directory.

    Only class-token ViTs without pre_logits have an HF layout. `gelu_approximate=True`
    (the tljax default) is exported as hidden_act 'gelu_pytorch_tanh', so logits match.
    Returns the output directory.
    """
    from safetensors.numpy import save_file

    params = variables.get("params", variables)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(vit.to_hf_state_dict(params, model_kwargs), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    config = vit.hf_config(params, model_kwargs)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
