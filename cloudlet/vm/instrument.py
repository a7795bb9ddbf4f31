"""Registration-time rewrite that makes all of a module's mutable state reachable.

A snapshot must capture every memory and every mutable global, but wasmtime
only lets the host touch *exported* items, and clang keeps the C stack pointer
(`__stack_pointer`) in a global it never exports. So, once per image, we add an
export for every memory (`__cloudlet_memory_N`) and every mutable global
(`__cloudlet_global_N`), N being the item's index in the module's index space.
Nothing else in the module changes, so its behaviour is untouched.

Tables hold function references that cannot be named from the host, so a table
whose contents can change cannot be captured; modules that mutate tables (or
drop data or element segments, which is state too) are rejected with the
instruction and offset named, rather than snapshotted wrongly. Immutable tables
(all clang C output) need no capture: they are rebuilt by instantiation.

Imports are checked here too: only the documented WASI preview1 subset, as
functions; imported memories, tables and globals would be state we cannot own.
"""

from __future__ import annotations

from dataclasses import dataclass

from cloudlet.errors import ImageRejected
from cloudlet.vm import wasm_binary as wb
from cloudlet.vm.hostfns import ALLOWED_IMPORTS, WASI_MODULE
from cloudlet.vm.write_tracking import DIRTY_EXPORT, add_write_tracking

EXPORT_PREFIX = "__cloudlet_"


@dataclass(frozen=True)
class MemoryInfo:
    export: str
    min_pages: int
    max_pages: int | None


@dataclass(frozen=True)
class GlobalInfo:
    export: str
    index: int
    valtype: str  # "i32" | "i64" | "f32" | "f64"


@dataclass(frozen=True)
class Instrumented:
    """The rewritten module and what the runtime needs to know about its state."""

    wasm: bytes
    memories: tuple[MemoryInfo, ...]
    globals: tuple[GlobalInfo, ...]
    imports: tuple[str, ...]  # WASI function names the module imports
    dirty_export: str | None = None  # the write-tracking bitmap memory, if tracked


def memory_export(index: int) -> str:
    return f"{EXPORT_PREFIX}memory_{index}"


def global_export(index: int) -> str:
    return f"{EXPORT_PREFIX}global_{index}"


def instrument(module: bytes, *, track_writes: bool = True) -> Instrumented:
    """Rewrite `module`; raise `ImageRejected` naming the problem if it cannot be hosted.

    With `track_writes`, a single-memory module also gets a dirty bitmap that every
    store marks (see `write_tracking`); other modules are left to hashing.
    """
    try:
        return _instrument(module, track_writes)
    except wb.WasmFormatError as exc:
        raise ImageRejected(f"malformed module: {exc}") from exc


def _instrument(module: bytes, track_writes: bool) -> Instrumented:
    sections = wb.split_sections(module)
    by_id = {s.id: s for s in sections if s.id != wb.SEC_CUSTOM}
    imports = _check_imports(by_id.get(wb.SEC_IMPORT))
    _check_tables_and_code(by_id.get(wb.SEC_CODE))
    memories = _memories(by_id.get(wb.SEC_MEMORY))
    globals_ = _mutable_globals(by_id.get(wb.SEC_GLOBAL))
    existing = _exports(by_id.get(wb.SEC_EXPORT))
    dirty_export = None
    if track_writes and len(memories) == 1:
        sections = add_write_tracking(sections, len(imports))
        dirty_export = DIRTY_EXPORT
    exports = _export_section(existing, memories, globals_, dirty_export)
    return Instrumented(wb.join_sections(_with_export(sections, exports)), tuple(memories),
                        tuple(globals_), tuple(imports), dirty_export)


# Memory limit flags we cannot host, and why (wasm_binary.read_limits).
_REFUSED_MEMORY_FLAGS = ((0x02, "is shared: threads are not supported"),
                         (0x04, "is 64-bit: memory64 is not supported"))


def _memories(section: wb.Section | None) -> list[MemoryInfo]:
    if section is None:
        return []
    memories: list[MemoryInfo] = []
    r = wb.Reader(section.payload)
    for index in range(r.uleb()):
        minimum, maximum, flags = wb.read_limits(r)
        for flag, why in _REFUSED_MEMORY_FLAGS:
            if flags & flag:
                raise ImageRejected(f"memory {index} {why}")
        memories.append(MemoryInfo(memory_export(index), minimum, maximum))
    return memories


def _mutable_globals(section: wb.Section | None) -> list[GlobalInfo]:
    """The globals a snapshot must capture: every mutable one, numeric only."""
    if section is None:
        return []
    globals_: list[GlobalInfo] = []
    r = wb.Reader(section.payload)
    for index in range(r.uleb()):
        valtype = wb.read_valtype(r)
        mutable = r.byte()
        if mutable not in (0, 1):
            raise ImageRejected(f"global {index} has a bad mutability flag")
        wb.skip_const_expr(r)
        if not mutable:
            continue
        if valtype not in ("i32", "i64", "f32", "f64"):
            raise ImageRejected(
                f"global {index} is a mutable {valtype}: only numeric mutable globals "
                "can be snapshotted"
            )
        globals_.append(GlobalInfo(global_export(index), index, valtype))
    return globals_


def _exports(section: wb.Section | None) -> list[bytes]:
    """The module's own export entries, as bytes, kept as they are."""
    if section is None:
        return []
    existing: list[bytes] = []
    r = wb.Reader(section.payload)
    for _ in range(r.uleb()):
        start = r.pos
        name = r.name()
        r.byte()
        r.uleb()
        if name.startswith(EXPORT_PREFIX):
            raise ImageRejected(f"export {name!r} uses the reserved prefix {EXPORT_PREFIX!r}")
        existing.append(bytes(r.data[start : r.pos]))
    return existing


def _export_section(existing: list[bytes], memories: list[MemoryInfo],
                    globals_: list[GlobalInfo], dirty_export: str | None) -> wb.Section:
    """The module's exports plus ours: every memory, the dirty bitmap (the memory
    after the module's own), every mutable global."""
    added = [wb.encode_name(m.export) + bytes([wb.KIND_MEMORY]) + wb.uleb_encode(i)
             for i, m in enumerate(memories)]
    if dirty_export:
        added.append(wb.encode_name(dirty_export) + bytes([wb.KIND_MEMORY])
                     + wb.uleb_encode(len(memories)))
    added += [wb.encode_name(g.export) + bytes([wb.KIND_GLOBAL]) + wb.uleb_encode(g.index)
              for g in globals_]
    entries = existing + added
    payload = wb.uleb_encode(len(entries)) + b"".join(entries)
    return wb.Section(wb.SEC_EXPORT, payload, 0)


def _with_export(sections: list[wb.Section], exports: wb.Section) -> list[wb.Section]:
    """`sections` with the export section replaced by `exports`, or `exports` added
    where the canonical section order puts it."""
    rewritten: list[wb.Section] = []
    placed = False
    export_rank = wb.SECTION_ORDER.index(wb.SEC_EXPORT)
    for s in sections:
        if s.id == wb.SEC_EXPORT:
            rewritten.append(exports)
            placed = True
            continue
        if (not placed and s.id != wb.SEC_CUSTOM
                and wb.SECTION_ORDER.index(s.id) > export_rank):
            rewritten.append(exports)
            placed = True
        rewritten.append(s)
    if not placed:
        rewritten.append(exports)
    return rewritten


def _check_imports(section: wb.Section | None) -> list[str]:
    if section is None:
        return []
    names: list[str] = []
    r = wb.Reader(section.payload)
    kinds = {wb.KIND_TABLE: "table", wb.KIND_MEMORY: "memory", wb.KIND_GLOBAL: "global",
             wb.KIND_TAG: "tag"}
    for _ in range(r.uleb()):
        module, name = r.name(), r.name()
        kind = r.byte()
        if kind != wb.KIND_FUNC:
            raise ImageRejected(
                f"import {module}.{name} is a {kinds.get(kind, 'unknown item')}: images may "
                "import only the documented WASI functions"
            )
        r.uleb()
        if module != WASI_MODULE or name not in ALLOWED_IMPORTS:
            raise ImageRejected(
                f"import {module}.{name} is not allowed: images may import only "
                f"{WASI_MODULE} functions {', '.join(sorted(ALLOWED_IMPORTS))} "
                "(no filesystem, no sockets)"
            )
        names.append(name)
    return names


def _check_tables_and_code(code: wb.Section | None) -> None:
    if code is None:
        return
    r = wb.Reader(code.payload)
    for func in range(r.uleb()):
        size = r.uleb()
        end = r.pos + size
        body = wb.Reader(r.data, r.pos, end)
        for _ in range(body.uleb()):
            body.uleb()
            wb.read_valtype(body)
        mutators = wb.find_state_mutators(body)
        if mutators:
            name, at = mutators[0]
            raise ImageRejected(
                f"function {func} uses {name} (code offset {code.offset + at}): table "
                "contents and dropped segments cannot be snapshotted, so modules that change "
                "them are not supported"
            )
        r.pos = end
