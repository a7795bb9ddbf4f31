"""`cloudlet vm run` and `cloudlet vm inspect`: try VMs and snapshots by hand.

(`cloudlet vm ls|create|call|destroy`, which act on cloudlets, are the SDK's:
mobile_client/cli.py adds them to this group.)

A call is written `"FN ARG..."`. Numeric arguments are converted by the
function's signature (decimal or 0x-hex integers, floats). A bytes function
(`(i32, i32) -> i64`, see docs/abi.md) takes one argument: `s:TEXT` (UTF-8),
`x:HEX`, or `@FILE`; its result prints as `x:HEX`. Each result goes on its own
line (integers in decimal; multiple results space-separated; no result, an
empty line), so output lines match calls one to one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cloudlet.commands.callspec import bytes_arg, format_result, is_bytes_arg, split_call
from cloudlet.errors import BadCall, CloudletError
from cloudlet.vm.chunks import CHUNK_BYTES
from cloudlet.vm.image import ImageStore
from cloudlet.vm.machine import VM, FuncSig, MiB, VMLimits
from cloudlet.vm.snapshot import Snapshot, read_header

BYTES_SIG = FuncSig(("i32", "i32"), ("i64",))
_INT_RANGE = {"i32": (-(1 << 31), (1 << 32) - 1), "i64": (-(1 << 63), (1 << 64) - 1)}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    vm = sub.add_parser("vm", help="run VMs and inspect snapshots here, or manage them on "
                                   "cloudlets")
    vm_sub = vm.add_subparsers(dest="vm_command", metavar="VM_COMMAND")
    vm_sub.required = True

    run = vm_sub.add_parser(
        "run", help="create (or resume) a VM, apply calls, optionally snapshot it",
        description="Create a VM from IMAGE.wasm (or resume one with --from-snapshot), apply "
                    "each --call in order printing each result on its own line, then write a "
                    "snapshot if --snapshot-out is given.")
    run.add_argument("image", nargs="?", metavar="IMAGE.wasm",
                     help="the image (optional with --from-snapshot: the store is searched)")
    run.add_argument("--call", action="append", default=[], metavar='"FN ARG..."',
                     help="a call to apply; repeat for a sequence")
    run.add_argument("--from-snapshot", metavar="FILE", help="resume the VM in this snapshot")
    run.add_argument("--snapshot-out", metavar="FILE", help="write a snapshot after the calls")
    run.add_argument("--image-store", metavar="DIR",
                     help="image cache (default $CLOUDLET_HOME/images, ~/.cache/cloudlet/images)")
    run.add_argument("--memory-mib", type=int, help="memory cap (default 256)")
    run.add_argument("--fuel", type=int, help="fuel per call (default 10e9)")
    run.add_argument("--deadline-ms", type=int, help="wall-clock deadline per call (default 2000)")
    run.add_argument("--clock", choices=("real", "virtual"), default="real",
                     help="guest clock: real, or virtual (deterministic)")
    run.add_argument("--random-seed", metavar="HEX",
                     help="seed (32 bytes as hex) for the guest's random_get: repeatable runs")
    run.add_argument("--show-log", action="store_true",
                     help="print what the guest wrote to stdout/stderr to stderr at the end")
    run.set_defaults(handler=cmd_run)

    inspect = vm_sub.add_parser("inspect", help="describe a snapshot file")
    inspect.add_argument("file", metavar="FILE")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(handler=cmd_inspect)


def _limits(args: argparse.Namespace, base: VMLimits) -> VMLimits:
    memory = args.memory_mib * MiB if args.memory_mib is not None else base.memory_bytes
    try:
        return VMLimits(
            memory_bytes=memory,
            fuel_per_call=args.fuel if args.fuel is not None else base.fuel_per_call,
            deadline_ms=args.deadline_ms if args.deadline_ms is not None else base.deadline_ms,
        )
    except ValueError as exc:
        raise BadCall(f"bad limit: {exc}") from None


def cmd_run(args: argparse.Namespace) -> int:
    store = ImageStore(args.image_store)
    if args.from_snapshot:
        snap = Snapshot.read(args.from_snapshot)
        image = store.add_file(args.image) if args.image else store.get(snap.image_digest)
        vm = VM.restore(image, snap)
        if any(x is not None for x in (args.memory_mib, args.fuel, args.deadline_ms)):
            vm.set_limits(_limits(args, vm.limits))
    else:
        if not args.image:
            raise BadCall("give IMAGE.wasm, or --from-snapshot FILE")
        image = store.add_file(args.image)
        seed = None
        if args.random_seed is not None:
            try:
                seed = bytes.fromhex(args.random_seed)
            except ValueError:
                seed = None
            if seed is None or len(seed) != 32:
                raise BadCall("--random-seed must be 64 hex digits (32 bytes)")
        vm = VM.create(image, _limits(args, VMLimits()), clock=args.clock, random_seed=seed)
    try:
        for spec in args.call:
            print(apply_call(vm, spec), flush=True)
        if args.snapshot_out:
            vm.snapshot().write(args.snapshot_out)
    finally:
        if args.show_log and vm.host.log:
            import sys

            sys.stderr.write(vm.host.log.decode("utf-8", "replace"))
        vm.close()
    return 0


def apply_call(vm: VM, spec: str) -> str:
    """Apply one `"FN ARG..."` call and format its result as one line."""
    name, raw_args = split_call(spec)
    sig = vm.image.functions.get(name)
    if sig is None:
        public = sorted(n for n in vm.image.functions if not n.startswith("_"))
        raise BadCall(f"image exports no function {name!r}; it has: {', '.join(public)}")
    if sig == BYTES_SIG and len(raw_args) == 1 and is_bytes_arg(raw_args[0]):
        return "x:" + vm.call_bytes(name, bytes_arg(raw_args[0])).hex()
    if len(raw_args) != len(sig.params):
        raise BadCall(f"{name} takes {len(sig.params)} arguments ({', '.join(sig.params)}), "
                      f"got {len(raw_args)}")
    values = [_convert(a, t, name) for a, t in zip(raw_args, sig.params, strict=True)]
    return format_result(vm.call(name, *values))


def _convert(arg: str, valtype: str, fn: str) -> int | float:
    try:
        if valtype in _INT_RANGE:
            value = int(arg, 0)
            lo, hi = _INT_RANGE[valtype]
            if not lo <= value <= hi:
                raise BadCall(f"{fn}: {arg} does not fit {valtype}")
            bits = 32 if valtype == "i32" else 64
            return (value + (1 << (bits - 1))) % (1 << bits) - (1 << (bits - 1))
        return float(arg)
    except ValueError:
        raise BadCall(f"{fn}: {arg!r} is not a valid {valtype}") from None


def describe(path: str) -> dict[str, Any]:
    """What `vm inspect` reports about a snapshot file."""
    data = Path(path).read_bytes() if Path(path).is_file() else None
    if data is None:
        raise CloudletError(f"no snapshot file at {path}")
    header = read_header(data)
    snap = Snapshot.from_bytes(data)
    return {
        "file": str(path),
        "file_bytes": len(data),
        "format_version": header["format"],
        "compression": header["compression"],
        "kind": snap.kind,
        "snapshot_id": snap.snapshot_id,
        "base_id": snap.base_id,
        "image_digest": snap.image_digest,
        "vm_id": snap.vm_id,
        "owner": snap.owner,
        "seq": snap.seq,
        "memory_bytes": snap.memory_bytes,
        "overlay_bytes": snap.overlay_bytes,
        "chunks": snap.chunk_count,
        "zero_chunks": sum(len(m.zero_ids) for m in snap.memories),
        "chunk_bytes": CHUNK_BYTES,
        "memories": [m.pages for m in snap.memories],
        "globals": len(snap.globals),
        "fuel_used": snap.fuel_used,
        "limits": snap.limits.to_wire(),
        "log_bytes": len(snap.host["log"]),
        "created_unix_ms": snap.created_unix_ms,
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    info = describe(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    mib = 1 << 20
    rows = [
        ("image", f"sha256:{info['image_digest']}"),
        ("format version", str(info["format_version"])),
        ("kind", info["kind"] + (f" (base {info['base_id']})" if info["base_id"] else "")),
        ("memory size", f"{info['memory_bytes']} bytes ({info['memory_bytes'] / mib:.2f} MiB)"),
        ("overlay size", f"{info['overlay_bytes']} bytes ({info['chunks']} chunks of "
                         f"{CHUNK_BYTES}, {info['zero_chunks']} zero chunks elided)"),
        ("sequence number", str(info["seq"])),
        ("file size", f"{info['file_bytes']} bytes ({info['compression']})"),
        ("vm", str(info["vm_id"])),
        ("fuel used", str(info["fuel_used"])),
    ]
    for key, value in rows:
        print(f"{key:<16} {value}")
    return 0
