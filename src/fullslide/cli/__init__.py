"""The ``fullslide`` command line: one subcommand per job, each a thin call into the library.

Subcommands are registered explicitly from three small modules (slide I/O, engine, application);
heavy imports (torch, slide libraries) happen inside the command functions, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from fullslide import __version__
from fullslide.errors import FullslideError


class _Formatter(logging.Formatter):
    """Plain messages for progress (INFO); the level and source for warnings and errors."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO:
            return record.getMessage()
        return f"{record.levelname.lower()}: {record.getMessage()}"


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand attached."""
    from fullslide.cli import app_cmds, engine_cmds, experiment_cmds, io_cmds

    parser = argparse.ArgumentParser(
        prog="fullslide",
        description="Exact end-to-end training on whole-slide images.",
    )
    parser.add_argument("--version", action="version", version=f"fullslide {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (io_cmds, engine_cmds, app_cmds, experiment_cmds):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(_Formatter())
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler], force=True)
    try:
        return int(args.func(args) or 0)
    except FullslideError as exc:
        print(f"fullslide {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C (130), or SIGTERM acted on by train after saving (143)
        print(f"fullslide {args.command}: interrupted", file=sys.stderr)
        return 128 + int(getattr(exc, "signum", 2))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
