"""The ``wsiproto`` command (installed as ``wsiproto.cli``).

Each subcommand is one module with ``register(subparsers)``; the module's ``EXAMPLE`` is shown in
``wsiproto --help`` and in the subcommand's own ``--help``. User errors
(:class:`wsiproto.errors.WsiprotoError`) print one line on stderr and exit with code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from wsiproto import __version__
from wsiproto.errors import WsiprotoError

from . import cohort, demo, evaluate, info, pseudo_masks, sample, segment, train
from .options import OneLineParser

COMMANDS = (info, segment, cohort, train, evaluate, pseudo_masks, sample, demo)


def build_parser() -> argparse.ArgumentParser:
    examples = "\n".join(f"  {m.EXAMPLE}" for m in COMMANDS)
    parser = OneLineParser(
        prog="wsiproto",
        description=(
            "DualProtoSeg weakly supervised tissue segmentation for whole-slide images: "
            "train on patch datasets, segment gigapixel slides into OME-Zarr label pyramids "
            "and QuPath GeoJSON."
        ),
        epilog=f"examples:\n{examples}\n\nRun `wsiproto COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"wsiproto {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks and debug logging instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def add_command(sub, name: str, help: str, example: str, description: str | None = None):
    """A subparser whose --help ends with a worked example (shared by the command modules)."""
    return sub.add_parser(
        name,
        help=help,
        description=description or help,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="wsiproto: %(levelname)s: %(message)s",
    )
    if not args.debug:
        # tifffile and tiffslide log every oddity of a damaged file; our error says it once.
        for name in ("tifffile", "tiffslide"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, so that a closed pipe is handled below, not at exit
        return code
    except WsiprotoError as exc:
        if args.debug:
            raise
        print(f"wsiproto: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wsiproto: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (`wsiproto info --json | head`): end quietly, as
        # other Unix tools do, with the status a SIGPIPE death would give
        _silence_stdout()
        return 141
    except Exception as exc:  # a bug, not a user error: still one line unless --debug
        if args.debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"wsiproto: internal error: {type(exc).__name__}: {message} "
              "(rerun with --debug for the traceback and please report it)", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
