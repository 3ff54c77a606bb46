"""The ``emseg`` command: one parser built in one place, one function per subcommand.

Exit codes: 0 success; 1 some inputs failed (each reported on one line); 2 bad usage.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from emseg import __version__
from emseg.cli import export, measure, predict, pretrain, train
from emseg.cli.common import integer
from emseg.errors import EmsegError, OptionError

log = logging.getLogger("emseg")



# ---------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (the option, what is wrong, where to look)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full ``emseg`` argument parser."""
    parser = _Parser(
        prog="emseg", description="U-Net segmentation for electron microscopy.",
        epilog="Run `emseg COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"emseg {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors, no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    predict.add_parser(sub)

    p = sub.add_parser("models", help="list the encoders with parameters and GFLOPs per megapixel")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("summary", help="print each block's output shape for an encoder's U-Net")
    p.add_argument("encoder", help="encoder name (see `emseg models`)")
    p.add_argument("--size", type=integer(32, 32), default=512, help="input side in pixels (default 512)")
    p.add_argument("--classes", type=integer(1), default=2, help="output classes (default 2)")
    p.add_argument("--depth", type=integer(0), default=3, help="nesting depth of the table (default 3)")
    p.set_defaults(func=cmd_summary)

    train.add_parsers(sub)
    pretrain.add_parser(sub)
    measure.add_parser(sub)
    export.add_parser(sub)
    return parser


# ---------------------------------------------------------------- helpers


# ---------------------------------------------------------------- commands


def cmd_models(args: argparse.Namespace) -> int:
    from emseg.model.networks import DEFAULT_ENCODER
    from emseg.model.summary import cost_table
    rows = cost_table()
    print(f"{'encoder':<16} {'family':<9} {'params':>9} {'GFLOP/MP':>9}  description")
    for row in rows:
        mark = "  (default for new models)" if row.name == DEFAULT_ENCODER else ""
        print(f"{row.name:<16} {row.family:<9} {row.parameters / 1e6:>8.2f}M {row.gflops_per_mp:>9.1f}  "
              f"{row.description}{mark}")
    print("\nU-Net with 1 input channel and 2 classes; FLOPs counted by torch.utils.flop_counter "
          "(a multiply-add counts 2) on a 256x256 input.")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from emseg.model.summary import layer_summary
    print(layer_summary(args.encoder, size=args.size, classes=args.classes, depth=args.depth))
    return 0


# ---------------------------------------------------------------- entry point

class _Formatter(logging.Formatter):
    """``emseg: message``, with the level named for warnings and errors."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"emseg: {record.levelname.lower()}: {text}"
        return f"emseg: {text}"


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    handler.set_name("emseg-cli")
    logger = logging.getLogger("emseg")
    logger.handlers[:] = [h for h in logger.handlers if h.get_name() != "emseg-cli"] + [handler]
    logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Run the ``emseg`` command; returns the exit code."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code == 2:  # a usage error, already printed on one line
            return 2
        raise  # --help, --version
    _setup_logging(args.verbose, args.quiet)
    try:
        return args.func(args)
    except OptionError as exc:  # an option value the core rejects: a usage error
        log.error("%s", exc, exc_info=args.verbose)
        return 2
    except EmsegError as exc:
        log.error("%s", exc, exc_info=args.verbose)
        return 1
    except ValueError as exc:  # option values the core rejects (tile size, device, encoder name)
        if args.verbose:
            raise
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; finished outputs are kept, unfinished ones were removed")
        return 130
