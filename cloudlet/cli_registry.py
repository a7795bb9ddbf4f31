"""The `cloudlet` command's subcommands, found through entry points.

Each package declares the commands it adds in its own metadata (the
`cloudlet.subcommands` entry-point group: command name -> `module:register`),
so the core lists no command and names none of the packages built on it; a
package installed later adds its commands by being installed. The bracket after
an entry point names the extra its command needs: when the command's module
cannot import one of its dependencies, a stand-in command with that install hint
takes its place, so a device with only the client installed still gets a
working `cloudlet` that says what is missing instead of a traceback.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import Any

from cloudlet.errors import MissingDependency

GROUP = "cloudlet.subcommands"
# The distribution whose extras the install hints name.
DISTRIBUTION = "cloudlet"

_REQUIREMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser that keeps the subcommands it was given, so a package can
    add its commands to a group another package registered (the SDK adds
    `vm ls|create|call|destroy` to the VM runtime's `vm`). argparse keeps a
    parser's subparsers only in private fields; its subparsers are made of the
    parser's own class, so every group under a CommandParser keeps them too."""

    subcommands: argparse._SubParsersAction[argparse.ArgumentParser] | None = None

    def add_subparsers(self, **kwargs: Any) -> Any:
        self.subcommands = super().add_subparsers(**kwargs)
        return self.subcommands


def subcommands(group: argparse.ArgumentParser
                ) -> argparse._SubParsersAction[argparse.ArgumentParser] | None:
    """A command group's subcommands; None for a parser that is no group (e.g. the
    stand-in for a missing extra, or a parser not made by `cloudlet`)."""
    return group.subcommands if isinstance(group, CommandParser) else None


def declared() -> list[metadata.EntryPoint]:
    """Every installed package's subcommands, in the order `cloudlet --help` lists
    them: the core's own first, then each other package's, packages and commands by
    name (build tools sort entry points, so their order in pyproject.toml is lost)."""
    core = __name__.partition(".")[0]
    return sorted(metadata.entry_points(group=GROUP),
                  key=lambda ep: (_package(ep) != core, _package(ep), ep.name))


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                 entry_points: Iterable[metadata.EntryPoint]) -> None:
    """Register the commands of `entry_points` on `sub`. Entry points that name the
    same function are one call of it (a package may register several commands at
    once), in the order of the first of them. A name of two words ("vm ls") is a
    command of a group another package registers: its function gets the group's
    subcommands, once every group is there; none if the group is missing (its
    stand-in says what to install)."""
    commands: dict[str, list[metadata.EntryPoint]] = {}
    in_groups: dict[tuple[str, str], list[metadata.EntryPoint]] = {}
    for ep in entry_points:
        group, _, name = ep.name.partition(" ")
        if name:
            in_groups.setdefault((group, _target(ep)), []).append(ep)
        else:
            commands.setdefault(_target(ep), []).append(ep)
    for eps in commands.values():
        _add(sub, eps, [ep.name for ep in eps])
    for (group, _), eps in in_groups.items():
        parser = sub.choices.get(group)
        group_sub = subcommands(parser) if parser is not None else None
        if group_sub is not None:
            _add(group_sub, eps, [ep.name.partition(" ")[2] for ep in eps])


def _add(sub: argparse._SubParsersAction[argparse.ArgumentParser],
         eps: list[metadata.EntryPoint], names: list[str]) -> None:
    """One register function's commands (`names`, declared by `eps`), or stand-ins
    for them when it cannot import a dependency."""
    missing = None
    try:
        eps[0].load()(sub)
    except ModuleNotFoundError as exc:  # on import, or a register that imports late
        missing = exc.name or "?"
        if missing.partition(".")[0] == _package(eps[0]):
            return  # the package itself is not installed
    for ep, name in zip(eps, names, strict=True):
        extra = _extra_of(ep)
        if name in sub.choices:  # registered (perhaps before an import failed)
            if extra is not None:  # what to suggest if its handler finds a package missing
                sub.choices[name].set_defaults(extra=extra)
        elif missing is not None:
            extra = extra or extra_bringing(missing)
            stand_in = sub.add_parser(name, help=f"(needs: {install_hint(extra)})")
            stand_in.add_argument("rest", nargs=argparse.REMAINDER)
            stand_in.set_defaults(handler=_needs(extra, missing))


def extra_bringing(module: str) -> str | None:
    """The first of the distribution's extras that requires the package `module`
    is imported from (matched by name, as `prometheus_client` is
    `prometheus-client`); None for a module no extra brings. Read from the
    installed metadata, so pyproject.toml stays the one list."""
    wanted = _normal(module.partition(".")[0])
    try:
        requirements = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return None
    for requirement in requirements:
        name = _REQUIREMENT_NAME.match(requirement)
        extra = _EXTRA_MARKER.search(requirement)
        if name is not None and extra is not None and _normal(name.group()) == wanted:
            return extra.group(1)
    return None


def install_hint(extra: str | None) -> str:
    return f"pip install '{DISTRIBUTION}[{extra}]'" if extra else f"pip install {DISTRIBUTION}"


def missing_dependency(module: str, extra: str | None) -> MissingDependency:
    return MissingDependency(f"this command needs {module}: {install_hint(extra)}")


def _extra_of(ep: metadata.EntryPoint) -> str | None:
    return ep.extras[0] if ep.extras else None


def _package(ep: metadata.EntryPoint) -> str:
    return ep.module.partition(".")[0]


def _target(ep: metadata.EntryPoint) -> str:
    return f"{ep.module}:{ep.attr}"


def _normal(name: str) -> str:
    """A distribution name as packaging compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _needs(extra: str | None, module: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        raise missing_dependency(module, extra)
    return handler
