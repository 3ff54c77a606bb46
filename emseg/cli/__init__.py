"""The ``emseg`` command. :func:`main` is its entry point (``emseg = emseg.cli:main``); each subcommand's
parser and function live in a module of this package (predict, train, measure, export; app builds the whole)."""

import os

# OpenMP threads that sleep between torch operations instead of spinning: on a CPU shared with emseg's own
# reader, writer and batch threads, spinning threads stalled every short operation (the pipeline without its
# network: 13 MP/s spinning, 46-51 MP/s passive; a VGG11-BN forward pass 1.3-1.7 s against 0.8 s; see
# docs/performance.md). Set before torch is imported; an OMP_WAIT_POLICY of the user's own is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from emseg.cli.app import main  # noqa: E402 - after the OpenMP setting

__all__ = ["main"]
