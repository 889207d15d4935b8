"""Entry point of the ``vpr`` command: one parser, one module per subcommand."""

from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="vpr",
        description="Visual place recognition: describe images, build and query maps, "
                    "evaluate, train.")
    parser.add_argument("--version", action="version", version=f"vpr_ros {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMAND_MODULES:
        module = importlib.import_module(f"{__package__}.{name}_cmd")
        module.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        result = args.func(args)
    except VprError as exc:
        print(f"vpr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vpr {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
