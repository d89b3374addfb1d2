"""XLA flags tljax sets by default: added to $XLA_FLAGS when tljax is imported, before JAX
creates its backends (XLA reads the variable once, at the first computation).

    xla_cpu_experimental_ynn_fusion_type=-reduce
        XLA's CPU backend hands reductions to YNNPACK by default, which makes it write out
        the operand of every reduction first. The kernel gradient of a depthwise convolution
        (`tljax.models.layers.DepthwiseConv`) is k*k reductions of shifted slices times the
        output gradient: XLA's own reduction loops fuse the slice and the product instead.
        Matmuls stay on YNNPACK. EfficientNet-Lite0 train step (the quickstart): 1.18x on
        2 Zen 4 cores; ViT-S/16: unchanged (README "Performance", benchmarks/cpu_*.md).

A flag named in the user's own XLA_FLAGS is left as the user set it, and
TLJAX_XLA_DEFAULTS=0 adds none. The flags are added only under the jaxlib versions they were
measured with: XLA aborts the process on a flag it does not know.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import MutableMapping

DEFAULTS = {"xla_cpu_experimental_ynn_fusion_type": "-reduce"}
# jaxlib version prefixes that know every flag of DEFAULTS (re-measure before adding one).
MEASURED_JAXLIB = ("0.10.",)


def _jaxlib_version() -> str:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return ""


def apply(environ: MutableMapping[str, str] | None = None,
          jaxlib_version: str | None = None) -> list[str]:
    """Adds the DEFAULTS that `environ` (os.environ) does not set to its XLA_FLAGS; returns
    the flags added."""
    environ = os.environ if environ is None else environ
    if environ.get("TLJAX_XLA_DEFAULTS", "1").strip().lower() in ("0", "false", "no"):
        return []
    version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
    if not version.startswith(MEASURED_JAXLIB):
        return []
    current = environ.get("XLA_FLAGS", "")
    given = {word.lstrip("-").split("=", 1)[0] for word in current.split()}
    added = [f"--{name}={value}" for name, value in DEFAULTS.items() if name not in given]
    if added:
        environ["XLA_FLAGS"] = " ".join([current.strip(), *added]).strip()
    return added
