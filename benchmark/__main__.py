"""``python -m benchmark ...``: the same as the ``text-generation-benchmark`` console script."""

import sys

from benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
