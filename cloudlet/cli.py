"""The `cloudlet` command line.

Thin on purpose: parse arguments, call the library, print. Errors exit
non-zero with one line on stderr (`cloudlet: error [code]: message`), never a
traceback: a user trying things by hand should see what went wrong, and a
script should be able to match on the stable code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cloudlet import __version__
from cloudlet.cli_registry import (
    CommandParser,
    add_commands,
    declared,
    extra_bringing,
    missing_dependency,
)
from cloudlet.errors import CloudletError

EXIT_ERROR = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    """The parser of every installed package's commands (cloudlet.cli_registry):
    the daemon and the SDK register their own, so cloudlet never imports them
    (dependencies flow one way)."""
    parser = CommandParser(
        prog="cloudlet",
        description="VM-based cloudlets for edge computing.",
    )
    parser.add_argument("--version", action="version", version=f"cloudlet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_commands(sub, declared())
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
        return code
    except CloudletError as exc:
        print(f"cloudlet: error [{exc.code}]: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except ModuleNotFoundError as exc:
        bringing = extra_bringing(exc.name or "")
        if bringing is None:
            raise  # not a package an extra installs: a bug, shown as one
        err = missing_dependency(exc.name or "?", getattr(args, "extra", None) or bringing)
        print(f"cloudlet: error [{err.code}]: {err.message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("cloudlet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_ERROR
    except OSError as exc:
        print(f"cloudlet: error [os_error]: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
