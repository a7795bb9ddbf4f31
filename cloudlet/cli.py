"""The `cloudlet` command line.

Thin on purpose: parse arguments, call the library, print. Errors exit
non-zero with one line on stderr (`cloudlet: error [code]: message`), never a
traceback: a user trying things by hand should see what went wrong, and a
script should be able to match on the stable code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from cloudlet import __version__
from cloudlet.errors import CloudletError

EXIT_ERROR = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    from cloudlet.commands import sim as sim_commands
    from cloudlet.commands import vm as vm_commands

    parser = argparse.ArgumentParser(
        prog="cloudlet",
        description="VM-based cloudlets for edge computing.",
    )
    parser.add_argument("--version", action="version", version=f"cloudlet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    vm_commands.register(sub)
    sim_commands.register(sub)
    # The daemon and the SDK add their own commands when installed; cloudlet never
    # imports them directly (dependencies flow one way).
    for name in ("edge_agent.cli", "mobile_client.cli"):
        try:
            extra = importlib.import_module(name)
        except ImportError:
            continue
        extra.register(sub)
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
