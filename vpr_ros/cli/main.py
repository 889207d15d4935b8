"""Entry point of the ``vpr`` command: one parser, one module per subcommand."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
from typing import List, Optional

from ..errors import VprError

# Each module vpr_ros/cli/<name>_cmd.py defines register(subparsers).
SUBCOMMAND_MODULES = [
    "describe",
    "models",
    "map",
    "localize",
    "eval",
    "train",
    "bag",
    "demo",
]


class OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): the bad argument and where the
    help is; exit status 2 as usual.  Sub-commands inherit the class."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} "
                     f"(see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = OneLineParser(
        prog="vpr",
        description="Visual place recognition: describe images, build and query maps, "
                    "evaluate, train.")
    parser.add_argument("--version", action="version", version=f"vpr_ros {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars and no informational log lines: stderr holds "
                             "only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMAND_MODULES:
        module = importlib.import_module(f"{__package__}.{name}_cmd")
        module.register(sub)
    return parser


class _BarSafeHandler(logging.StreamHandler):
    """Log lines go through tqdm.write: on a line of their own, never glued to a bar."""

    def emit(self, record):
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 (logging must never raise)
            self.handleError(record)


def _close_bars() -> None:
    """Finish open progress bars so the next stderr line starts on a new line."""
    tqdm_mod = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm_mod, "tqdm", None), "_instances", None) or []):
        try:
            bar.close()
        except Exception:  # noqa: BLE001
            pass


def _quiet_bars():
    """--quiet: every progress bar is disabled (also explicit disable=False) until the
    returned function restores tqdm (main() called in-process leaves no trace)."""
    from tqdm import tqdm

    raw = tqdm.__dict__["__init__"]          # the descriptor itself (tqdm wraps __init__)
    init = tqdm.__init__

    def quiet_init(self, *args, **kwargs):
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    tqdm.__init__ = quiet_init

    def restore():
        tqdm.__init__ = raw
    return restore


def _error(args, message: str) -> int:
    _close_bars()
    print(f"vpr {args.command}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = _BarSafeHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, handlers=[handler])
    restore_bars = _quiet_bars() if args.quiet else (lambda: None)
    try:
        return _run(args)
    finally:
        restore_bars()


def _run(args) -> int:
    try:
        result = args.func(args)
    except VprError as exc:
        return _error(args, str(exc))
    except OSError as exc:
        # An input or output path the user gave (unreadable, missing, disk full, ...).
        # Output writers raise OutputError themselves; this is the net for the rest.
        if exc.filename is None and exc.errno not in _PATHLESS_ERRNOS:
            raise
        where = f"{exc.filename}: " if exc.filename is not None else ""
        return _error(args, f"{where}{exc.strerror or exc}")
    except KeyboardInterrupt:
        _close_bars()
        print(f"vpr {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


_PATHLESS_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


if __name__ == "__main__":
    sys.exit(main())
