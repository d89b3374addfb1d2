"""tljax: transfer learning in JAX/Flax.

    model, variables, info = tljax.load_pretrained("efficientnet_lite0", num_classes=10)
"""

from typing import Any

__version__ = "0.1.0"


def load_pretrained(spec: str, num_classes: int | None = None) -> Any:
    """(model, variables, info) for a checkpoint SPEC; see `tljax.pretrained.load_pretrained`."""
    from tljax.pretrained import load_pretrained as load

    return load(spec, num_classes)
