"""Converts a pretrained checkpoint into a tljax checkpoint directory.

    python tools/convert_checkpoint.py --source=SPEC --output=DIR [--num_classes=N]

SPEC is any `tljax.load_pretrained` spec (hf:DIR, timm:[ARCH:]FILE, big_vision:FILE.npz,
vit_jax:FILE.npz, torchvision:ARCH:FILE, efficientnet_lite0, ...). DIR receives the
variables (Orbax) and metadata.json with the PretrainedInfo, so `tljax:DIR` rebuilds
the model and a fine-tuning config can use `init.source=tljax, init.path=DIR`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tljax import checkpoint  # noqa: E402
from tljax.errors import report  # noqa: E402
from tljax.pretrained import load_pretrained  # noqa: E402


def convert(spec: str, output: str, num_classes: int | None = None) -> None:
    """Loads `spec` strictly and writes it with `tljax.checkpoint.save_variables`."""
    _, variables, info = load_pretrained(spec, num_classes=num_classes)
    metadata = {**dataclasses.asdict(info), "converted_from": spec}
    checkpoint.save_variables(output, variables, metadata=metadata)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True, help="a load_pretrained spec")
    parser.add_argument("--output", required=True, help="directory to write")
    parser.add_argument("--num_classes", type=int, default=None,
                        help="replace the head by a zero-initialised one of this size")
    parser.add_argument("--verbose", action="store_true", help="tracebacks for input errors")
    args = parser.parse_args(argv)
    try:
        convert(args.source, args.output, args.num_classes)
    except (OSError, ValueError, ImportError) as e:  # InputError is a ValueError
        if args.verbose:
            raise
        return report(e)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
