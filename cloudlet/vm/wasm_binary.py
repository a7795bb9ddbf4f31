"""Just enough of the WebAssembly binary format to instrument a module.

Why our own reader: the instrumentation needs to see every memory, global and
table (including unexported ones), to scan function bodies for instructions
that mutate tables, and to rewrite stores for write tracking. The binary format
is a list of length-prefixed sections, so a few hundred lines cover it, and no
maintained Python library exposes the pieces we need without pulling in a whole
toolchain.

Everything raises `WasmFormatError` (caught and turned into `ImageRejected`
by the instrumentation) on malformed input; wasmtime validates the module
fully afterwards, so this reader only has to be right on valid modules and
safe on invalid ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

MAGIC = b"\x00asm"
VERSION = b"\x01\x00\x00\x00"

# Section ids (spec 5.5.2) and the order non-custom sections must appear in.
SEC_CUSTOM, SEC_TYPE, SEC_IMPORT, SEC_FUNCTION, SEC_TABLE, SEC_MEMORY = 0, 1, 2, 3, 4, 5
SEC_GLOBAL, SEC_EXPORT, SEC_START, SEC_ELEMENT, SEC_CODE, SEC_DATA = 6, 7, 8, 9, 10, 11
SEC_DATACOUNT, SEC_TAG = 12, 13
SECTION_ORDER = [1, 2, 3, 4, 5, 13, 6, 7, 8, 9, 12, 10, 11]

# External kinds, shared by imports and exports.
KIND_FUNC, KIND_TABLE, KIND_MEMORY, KIND_GLOBAL, KIND_TAG = 0, 1, 2, 3, 4

VALTYPES = {0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64", 0x7B: "v128",
            0x70: "funcref", 0x6F: "externref"}


class WasmFormatError(ValueError):
    """The bytes are not a well-formed module (or use a form we do not support)."""


class Reader:
    """A cursor over bytes with the LEB128 decoders the format uses."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes | memoryview, pos: int = 0, end: int | None = None) -> None:
        if end is not None and end > len(data):  # a length read from the module, too long
            raise WasmFormatError(f"an item of {end - pos} bytes at offset {pos} runs past "
                                  "the end of data")
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def at_end(self) -> bool:
        return self.pos >= self.end

    def byte(self) -> int:
        if self.pos >= self.end:
            raise WasmFormatError(f"unexpected end of data at offset {self.pos}")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def bytes(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise WasmFormatError(f"unexpected end of data at offset {self.pos}")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.end:
            raise WasmFormatError(f"unexpected end of data at offset {self.pos}")
        self.pos += n

    def uleb(self, max_bits: int = 32) -> int:
        return self._leb(max_bits, signed=False)

    def sleb(self, max_bits: int = 64) -> int:
        return self._leb(max_bits, signed=True)

    def _leb(self, max_bits: int, signed: bool) -> int:
        result = shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
            if shift >= max_bits + 7:
                raise WasmFormatError(f"LEB128 too long at offset {self.pos}")
        if signed and b & 0x40:
            result -= 1 << shift
        return result

    def name(self) -> str:
        raw = self.bytes(self.uleb())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WasmFormatError("a name is not valid UTF-8") from exc


def uleb_encode(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_name(name: str) -> bytes:
    raw = name.encode("utf-8")
    return uleb_encode(len(raw)) + raw


@dataclass(frozen=True)
class Section:
    id: int
    payload: bytes
    offset: int  # of the payload within the original module, for error messages


def split_sections(module: bytes) -> list[Section]:
    """The module's sections in file order, payloads copied out."""
    if len(module) < 8 or module[:4] != MAGIC:
        raise WasmFormatError("not a WebAssembly module (bad magic number)")
    if module[4:8] != VERSION:
        raise WasmFormatError("unsupported WebAssembly binary version (a component?)")
    r = Reader(module, 8)
    sections: list[Section] = []
    while not r.at_end():
        sec_id = r.byte()
        if sec_id != SEC_CUSTOM and sec_id not in SECTION_ORDER:
            raise WasmFormatError(f"unknown section id {sec_id} at offset {r.pos - 1}")
        size = r.uleb()
        start = r.pos
        sections.append(Section(sec_id, r.bytes(size), start))
    return sections


def join_sections(sections: list[Section]) -> bytes:
    out = bytearray(MAGIC + VERSION)
    for s in sections:
        out.append(s.id)
        out += uleb_encode(len(s.payload))
        out += s.payload
    return bytes(out)


def read_limits(r: Reader) -> tuple[int, int | None, int]:
    """(min, max or None, flags). Flags bit 1 = shared, bit 2 = 64-bit."""
    flags = r.byte()
    if flags > 0x07:
        raise WasmFormatError(f"unknown limits flags 0x{flags:02x}")
    wide = 64 if flags & 0x04 else 32
    minimum = r.uleb(wide)
    maximum = r.uleb(wide) if flags & 0x01 else None
    return minimum, maximum, flags


def read_valtype(r: Reader) -> str:
    b = r.byte()
    if b in VALTYPES:
        return VALTYPES[b]
    raise WasmFormatError(f"unsupported value type 0x{b:02x} (GC and typed references are not)")


def skip_const_expr(r: Reader) -> None:
    """Skip a constant expression (global initialisers, segment offsets) up to its `end`."""
    while True:
        op = r.byte()
        if op == 0x0B:
            return
        if op in (0x41,):
            r.sleb(32)
        elif op == 0x42:
            r.sleb(64)
        elif op == 0x43:
            r.skip(4)
        elif op == 0x44:
            r.skip(8)
        elif op in (0x23, 0xD2):
            r.uleb()
        elif op == 0xD0:
            r.sleb(33)
        elif op in (0x6A, 0x6B, 0x6C, 0x7C, 0x7D, 0x7E):  # extended-const arithmetic
            pass
        elif op == 0xFD:
            if r.uleb() != 12:
                raise WasmFormatError("unsupported SIMD op in a constant expression")
            r.skip(16)
        else:
            raise WasmFormatError(f"unsupported opcode 0x{op:02x} in a constant expression")


# --- instruction scanning ---------------------------------------------------------

# Opcodes whose only immediate is one unsigned LEB128 (0x14/0x15: call_ref and
# return_call_ref, from typed function references, take a type index).
_ONE_ULEB = {0x0C, 0x0D, 0x10, 0x12, 0x14, 0x15, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26,
             0x3F, 0x40, 0xD2}
# Single-byte opcodes in the range we decode that no proposal we accept assigns:
# refuse them rather than guess their immediates.
_UNASSIGNED = {0x16, 0x17, 0x1D, 0x1E, 0x27}
_MEMARG = set(range(0x28, 0x3F))
_EXCEPTIONS = {0x06, 0x07, 0x08, 0x09, 0x18, 0x19, 0x1F, 0x0A}
# SIMD (0xFD) sub-opcodes with immediates; every other SIMD op has none.
_SIMD_MEMARG = set(range(0x00, 0x0C)) | {0x5C, 0x5D}
_SIMD_LANE = set(range(0x15, 0x23))
_SIMD_MEMARG_LANE = set(range(0x54, 0x5C))

# Instructions that change state a snapshot cannot capture through exports:
# table contents and dropped segments. Named for the rejection message.
STATE_MUTATORS = {
    ("", 0x26): "table.set",
    ("fc", 9): "data.drop",
    ("fc", 12): "table.init",
    ("fc", 13): "elem.drop",
    ("fc", 14): "table.copy",
    ("fc", 15): "table.grow",
    ("fc", 17): "table.fill",
}


@dataclass(frozen=True)
class Instr:
    """One decoded instruction: where it is, what it is, and its memory operand if any."""

    start: int
    end: int
    op: int  # the first byte
    sub: int = -1  # the sub-opcode of 0xFC / 0xFD prefixed instructions
    memidx: int = -1  # memory of a load/store (-1: no memarg)
    offset: int = 0  # memarg offset


def _memarg(r: Reader) -> tuple[int, int]:
    align = r.uleb()
    memidx = r.uleb() if align & 0x40 else 0  # multi-memory: an explicit memory index
    return memidx, r.uleb(64)


def iter_instructions(r: Reader) -> Iterator[Instr]:
    """Decode every instruction up to `r.end`, immediates included, so that a byte
    inside an immediate is never taken for an opcode."""
    while not r.at_end():
        at = r.pos
        op = r.byte()
        sub, memidx, offset = -1, -1, 0
        if op in (0x02, 0x03, 0x04):  # block/loop/if: block type is s33
            r.sleb(33)
        elif op in _ONE_ULEB:
            value = r.uleb()
            if op in (0x3F, 0x40):
                memidx = value
        elif op in _MEMARG:
            memidx, offset = _memarg(r)
        elif op == 0x0E:  # br_table
            for _ in range(r.uleb()):
                r.uleb()
            r.uleb()
        elif op in (0x11, 0x13):  # call_indirect / return_call_indirect
            r.uleb()
            r.uleb()
        elif op == 0x1C:  # typed select
            for _ in range(r.uleb()):
                read_valtype(r)
        elif op == 0x41:
            r.sleb(32)
        elif op == 0x42:
            r.sleb(64)
        elif op == 0x43:
            r.skip(4)
        elif op == 0x44:
            r.skip(8)
        elif op == 0xD0:
            r.sleb(33)
        elif op == 0xFC:
            sub = r.uleb()
            if sub <= 7:
                pass
            elif sub == 8:  # memory.init seg mem
                r.uleb()
                memidx = r.uleb()
            elif sub == 10:  # memory.copy dst src
                memidx = r.uleb()
                r.uleb()
            elif sub == 11:  # memory.fill mem
                memidx = r.uleb()
            elif sub in (12, 14):
                r.uleb()
                r.uleb()
            elif sub in (9, 13, 15, 16, 17):
                r.uleb()
            else:
                raise WasmFormatError(f"unsupported instruction 0xfc {sub} at offset {at}")
        elif op == 0xFD:
            sub = r.uleb()
            if sub in _SIMD_MEMARG:
                memidx, offset = _memarg(r)
            elif sub in (0x0C, 0x0D):
                r.skip(16)
            elif sub in _SIMD_LANE:
                r.skip(1)
            elif sub in _SIMD_MEMARG_LANE:
                memidx, offset = _memarg(r)
                r.skip(1)
        elif op == 0xFE:
            raise WasmFormatError(f"atomics (threads) are not supported (offset {at})")
        elif op in _EXCEPTIONS:
            raise WasmFormatError(f"exception handling is not supported (offset {at})")
        elif op > 0xD2 or op in _UNASSIGNED:
            raise WasmFormatError(f"unknown opcode 0x{op:02x} at offset {at}")
        yield Instr(at, r.pos, op, sub, memidx, offset)


def find_state_mutators(body: Reader) -> list[tuple[str, int]]:
    """(name, offset) of each instruction in a body that changes tables or drops segments."""
    found = []
    for ins in iter_instructions(body):
        key = ("fc", ins.sub) if ins.op == 0xFC else ("", ins.op)
        name = STATE_MUTATORS.get(key)
        if name:
            found.append((name, ins.start))
    return found
