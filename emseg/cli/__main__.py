"""``python -m emseg.cli``: the ``emseg`` command."""

import sys

from emseg.cli import main

if __name__ == "__main__":
    sys.exit(main())
