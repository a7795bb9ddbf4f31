"""The SDK's commands for the `cloudlet` command line: `offload` and `session`.

    cloudlet offload [--endpoint URL] IMAGE.wasm FN [ARGS...]
    cloudlet session [--endpoint URL] IMAGE.wasm        (one call per stdin line)

Cloudlets are found at `--endpoint` (repeatable), else through `--broker`
(default `$CLOUDLET_BROKER`, else the address of `cloudlet up`'s broker). The
token is `--token`, else `$CLOUDLET_TOKEN`, else, on a machine that runs the
cloudlets (`cloudlet up`), one minted from the metro's secret for client `--client`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

from cloudlet.commands.callspec import (
    bytes_arg,
    format_result,
    is_bytes_arg,
    number_arg,
    split_call,
)
from cloudlet.errors import CloudletError, ConfigError
from cloudlet.protocol import BROKER_ENV, DEFAULT_BROKER, default_broker
from cloudlet.trust.cluster import SECRET_FILE, cluster_tokens, default_metro_dir
from mobile_client.client import POLICIES, CloudletClient
from mobile_client.session import Session

DISCOVERY_WAIT_S = 3.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    offload = sub.add_parser("offload", help="run one task on a cloudlet and print the result",
                             description="Offload one call of IMAGE.wasm to the nearest "
                                         "cloudlet; print its result and the latency.")
    _common(offload)
    offload.add_argument("image", metavar="IMAGE.wasm")
    offload.add_argument("fn", metavar="FN")
    offload.add_argument("args", nargs="*", metavar="ARG",
                         help="numbers, or one bytes argument: s:TEXT, x:HEX or @FILE")
    offload.add_argument("--policy", choices=POLICIES, default="remote",
                         help="where to run: remote (default), local, or auto (measured)")
    offload.add_argument("--deadline-ms", type=float, default=5000.0)
    offload.set_defaults(handler=cmd_offload)

    session = sub.add_parser("session", help="an interactive session: one call per stdin line",
                             description="Start a VM of IMAGE.wasm on the nearest cloudlet and "
                                         "apply each line of standard input ('FN ARG...') to "
                                         "it, printing each result; latency stats at the end.")
    _common(session)
    session.add_argument("image", metavar="IMAGE.wasm")
    session.add_argument("--budget-ms", type=float, default=30.0)
    session.add_argument("--keep", action="store_true",
                         help="keep the VM when the session ends (cloudlet vm call/destroy "
                              "reach it later)")
    session.set_defaults(handler=cmd_session)


def register_vm_commands(vm_sub: argparse._SubParsersAction[argparse.ArgumentParser]
                         ) -> None:
    """`cloudlet vm ls|create|call|destroy`: this client's VMs on the cloudlets, added to
    the `vm` group of the VM runtime's commands (`cloudlet vm run|inspect`)."""
    ls = vm_sub.add_parser("ls", help="list this client's VMs on every known cloudlet")
    _common(ls)
    ls.set_defaults(handler=cmd_vm_ls)
    create = vm_sub.add_parser("create", help="create a VM on a cloudlet; print its id",
                               description="Create a VM of IMAGE.wasm on cloudlet --node, "
                                           "or on the one with the lowest RTT; print its id "
                                           "and where it is. It lives until destroyed.")
    _common(create)
    create.add_argument("image", metavar="IMAGE.wasm")
    create.add_argument("--node", metavar="NODE", help="the cloudlet (default: nearest)")
    create.add_argument("--memory-mib", type=int, help="memory cap of the VM")
    create.set_defaults(handler=cmd_vm_create)
    call = vm_sub.add_parser("call", help="apply one call to a VM on a cloudlet",
                             description="Apply FN ARG... to this client's VM, wherever it "
                                         "is (exactly once, as a session does); print the "
                                         "result.")
    _common(call)
    call.add_argument("vm", metavar="VM")
    call.add_argument("fn", metavar="FN")
    call.add_argument("args", nargs="*", metavar="ARG",
                      help="numbers, or one bytes argument: s:TEXT, x:HEX or @FILE")
    call.set_defaults(handler=cmd_vm_call)
    destroy = vm_sub.add_parser("destroy", help="destroy a VM on a cloudlet")
    _common(destroy)
    destroy.add_argument("vm", metavar="VM")
    destroy.set_defaults(handler=cmd_vm_destroy)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", action="append", default=[], metavar="URL",
                        help="a cloudlet's URL (repeatable); default: discover via --broker")
    parser.add_argument("--broker", metavar="mqtt://HOST:PORT",
                        help=f"find cloudlets through this broker (default ${BROKER_ENV}, "
                             f"else {DEFAULT_BROKER})")
    parser.add_argument("--token", help="bearer token (default $CLOUDLET_TOKEN, or minted "
                                        "from the local metro's secret)")
    parser.add_argument("--client", default="cli", help="client name for a minted token")
    parser.add_argument("--state-dir", metavar="DIR", help="the local metro's state directory")


def _token(args: argparse.Namespace) -> str:
    token: str | None = args.token or os.environ.get("CLOUDLET_TOKEN")
    if token:
        return token
    state = Path(args.state_dir) if args.state_dir else default_metro_dir()
    if not (state / SECRET_FILE).exists():
        raise ConfigError(f"no token: pass --token, set CLOUDLET_TOKEN, or run 'cloudlet up' "
                          f"(no metro secret at {state / SECRET_FILE})")
    return cluster_tokens(state).issue(args.client, 3600)


def _client(args: argparse.Namespace, policy: str = "remote") -> CloudletClient:
    broker = None if args.endpoint else (args.broker or default_broker())
    # The client waits up to DISCOVERY_WAIT_S for a first cloudlet's presence, and
    # names the broker if none comes.
    return CloudletClient(_token(args), endpoints=args.endpoint, broker=broker, policy=policy,
                          discovery_wait_s=DISCOVERY_WAIT_S)


def _payload(fn: str, raw: list[str]) -> bytes | list[int | float]:
    if len(raw) == 1 and is_bytes_arg(raw[0]):
        return bytes_arg(raw[0])
    return [number_arg(a, fn) for a in raw]


def cmd_offload(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _client(args, args.policy) as client:
            out = await client.offload(args.image, args.fn, _payload(args.fn, args.args),
                                       deadline_ms=args.deadline_ms)
        print(format_result(out.value))
        print(f"latency {out.latency_ms:.2f} ms on {out.where} ({out.decision.reason})",
              file=sys.stderr)
        return 0
    return asyncio.run(run())


def cmd_session(args: argparse.Namespace) -> int:
    async def run() -> int:
        failures = 0
        async with _client(args) as client, \
                client.session(args.image, budget_ms=args.budget_ms, keep=args.keep) as s:
            print(f"session: VM {s.vm_id} on {s.location.node}", file=sys.stderr)
            loop = asyncio.get_running_loop()
            while line := await loop.run_in_executor(None, sys.stdin.readline):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                started = time.perf_counter()
                try:
                    fn, raw = split_call(line)
                    result = await s.call(fn, *_call_args(fn, raw))
                except CloudletError as exc:
                    failures += 1
                    print(f"error [{exc.code}]: {exc.message}", flush=True)
                    continue
                print(format_result(result), flush=True)
                print(f"  {(time.perf_counter() - started) * 1000:.2f} ms",
                      file=sys.stderr)
            print(_summary(s, args.budget_ms, failures), file=sys.stderr)
        return 1 if failures else 0
    return asyncio.run(run())


def cmd_vm_ls(args: argparse.Namespace) -> int:
    async def run() -> list[tuple[Any, dict[str, Any]]]:
        async with _client(args) as client:
            return await client.list_vms()

    found = asyncio.run(run())
    print(f"{'VM':<18} {'CLOUDLET':<14} {'SEQ':>6} {'MEMORY':>10}  IMAGE")
    for info, vm in found:
        mib = int(vm.get("memory_bytes", 0)) / (1 << 20)
        print(f"{vm.get('vm', '?'):<18} {info.node:<14} {vm.get('seq', 0):>6} "
              f"{mib:>7.1f} MiB  {str(vm.get('image', ''))[:19]}")
    return 0


def cmd_vm_create(args: argparse.Namespace) -> int:
    limits = {"memory_bytes": args.memory_mib << 20} if args.memory_mib else None

    async def run() -> tuple[str, Any]:
        async with _client(args) as client:
            return await client.create_vm(args.image, node=args.node, limits=limits)

    vm_id, where = asyncio.run(run())
    print(f"{vm_id} {where.node} {where.endpoint}")
    return 0


def cmd_vm_call(args: argparse.Namespace) -> int:
    async def run() -> Any:
        async with _client(args) as client:
            where = await client.find_vm(args.vm)
            async with client.attach(args.vm, where.endpoint) as s:
                return await s.call(args.fn, *_call_args(args.fn, args.args))

    print(format_result(asyncio.run(run())))
    return 0


def cmd_vm_destroy(args: argparse.Namespace) -> int:
    async def run() -> Any:
        async with _client(args) as client:
            return await client.destroy_vm(args.vm)

    where = asyncio.run(run())
    print(f"destroyed {args.vm} on {where.node}", file=sys.stderr)
    return 0


def _summary(s: Session, budget_ms: float, failures: int) -> str:
    """The session's last line: latencies of the calls answered (none: said so)."""
    st = s.stats()
    failed = f", {failures} failed" if failures else ""
    if not st.calls or st.p50_ms != st.p50_ms:  # NaN: no call was answered
        return f"no call answered{failed}; {st.moves_followed} moves followed"
    return (f"{st.calls} calls{failed}: p50 {st.p50_ms:.2f} ms, p99 {st.p99_ms:.2f} ms, "
            f"{st.within_budget:.0%} within {budget_ms:g} ms; "
            f"{st.moves_followed} moves followed")


def _call_args(fn: str, raw: list[str]) -> list[int | float | bytes]:
    payload = _payload(fn, raw)
    return [payload] if isinstance(payload, bytes) else list(payload)
