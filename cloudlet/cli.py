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
from collections.abc import Callable, Sequence

from cloudlet import __version__
from cloudlet.errors import CloudletError, MissingDependency

EXIT_ERROR = 1
EXIT_USAGE = 2


# Each family of commands, the commands it adds, and the extra that installs what it
# needs. The daemon and the SDK register their own commands; cloudlet never
# imports them directly (dependencies flow one way), and a device with only the
# client installed still gets a working `cloudlet` that says what is missing.
COMMANDS: list[tuple[str, tuple[str, ...], str]] = [
    ("cloudlet.commands.vm", ("vm",), "local"),
    ("cloudlet.commands.sim", ("sim",), "sim"),
    ("cloudlet.commands.calibrate", ("calibrate",), "sim"),
    ("edge_agent.cli", ("agent", "up", "orchestrator", "token", "status", "migrate",
                        "broker-config", "emulate"), "edge"),
    ("mobile_client.cli", ("offload", "session"), ""),
]
# Third-party modules and the extra that brings each (for the error that names it).
EXTRA_OF_MODULE = {"wasmtime": "local", "numpy": "local", "xxhash": "local",
                   "zstandard": "local", "matplotlib": "sim", "tqdm": "sim",
                   "amqtt": "edge", "uvloop": "edge", "prometheus_client": "edge"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cloudlet",
        description="VM-based cloudlets for edge computing.",
    )
    parser.add_argument("--version", action="version", version=f"cloudlet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module, names, extra in COMMANDS:
        try:
            commands = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] in ("cloudlet", "edge_agent",
                                                       "mobile_client"):
                continue  # that part of Cloudlet is not installed at all
            for name in names:
                missing = sub.add_parser(name, help=f"(needs: pip install 'cloudlet[{extra}]')")
                missing.add_argument("rest", nargs=argparse.REMAINDER)
                missing.set_defaults(handler=_needs(extra, exc.name or "?"))
            continue
        commands.register(sub)
        for name in names:  # what to suggest if a handler finds a package missing
            if name in sub.choices:
                sub.choices[name].set_defaults(extra=extra)
    return parser


def subcommands(group: argparse.ArgumentParser
                ) -> argparse._SubParsersAction[argparse.ArgumentParser] | None:
    """A command group's subcommands, for a package that adds its own to a group
    another registered (the SDK adds `vm ls|create|call|destroy` to the runtime's
    `vm`); None for a parser that is no group (e.g. the stand-in for a missing extra)."""
    for action in group._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _needs(extra: str, module: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        raise MissingDependency(f"this command needs {module}: pip install 'cloudlet[{extra}]'")
    return handler


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
        extra = EXTRA_OF_MODULE.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        extra = getattr(args, "extra", None) or extra
        err = MissingDependency(f"this command needs {exc.name}: pip install 'cloudlet[{extra}]'")
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
