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

from collections.abc import Callable, Iterator
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


def _v128_const(r: Reader) -> None:
    if r.uleb() != 12:
        raise WasmFormatError("unsupported SIMD op in a constant expression")
    r.skip(16)


def _nothing(r: Reader) -> None:
    pass


# The opcodes a constant expression may hold, each with how to skip its immediate.
_CONST_IMMEDIATES: dict[int, Callable[[Reader], object]] = {
    0x41: lambda r: r.sleb(32), 0x42: lambda r: r.sleb(64),  # i32/i64.const
    0x43: lambda r: r.skip(4), 0x44: lambda r: r.skip(8),  # f32/f64.const
    0x23: Reader.uleb, 0xD2: Reader.uleb,  # global.get, ref.func
    0xD0: lambda r: r.sleb(33),  # ref.null
    **dict.fromkeys((0x6A, 0x6B, 0x6C, 0x7C, 0x7D, 0x7E), _nothing),  # extended-const
    0xFD: _v128_const,
}


def skip_const_expr(r: Reader) -> None:
    """Skip a constant expression (global initialisers, segment offsets) up to its `end`."""
    while (op := r.byte()) != 0x0B:
        skip = _CONST_IMMEDIATES.get(op)
        if skip is None:
            raise WasmFormatError(f"unsupported opcode 0x{op:02x} in a constant expression")
        skip(r)


# --- instruction scanning ---------------------------------------------------------

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


# How to read an instruction's immediates: one reader per opcode, indexed by its
# first byte, giving (sub-opcode, memory index, memarg offset) with -1, -1, 0 for
# what it does not have. `None`: no immediates. Decoding is then one lookup per
# instruction, and a reader is a few lines that a test can name.
_Immediates = Callable[[Reader, int], tuple[int, int, int]]
_NONE = (-1, -1, 0)


def _skip_uleb(r: Reader, at: int) -> tuple[int, int, int]:
    r.uleb()
    return _NONE


def _skip_uleb_pair(r: Reader, at: int) -> tuple[int, int, int]:
    r.uleb()
    r.uleb()
    return _NONE


def _memory_index(r: Reader, at: int) -> tuple[int, int, int]:  # memory.size/grow
    return -1, r.uleb(), 0


def _load_store(r: Reader, at: int) -> tuple[int, int, int]:
    memidx, offset = _memarg(r)
    return -1, memidx, offset


def _br_table(r: Reader, at: int) -> tuple[int, int, int]:
    for _ in range(r.uleb()):
        r.uleb()
    r.uleb()
    return _NONE


def _typed_select(r: Reader, at: int) -> tuple[int, int, int]:
    for _ in range(r.uleb()):
        read_valtype(r)
    return _NONE


def _skip(n: int) -> _Immediates:
    def skip(r: Reader, at: int) -> tuple[int, int, int]:
        r.skip(n)
        return _NONE
    return skip


def _sleb(bits: int) -> _Immediates:
    def sleb(r: Reader, at: int) -> tuple[int, int, int]:
        r.sleb(bits)
        return _NONE
    return sleb


def _refuse(why: str) -> _Immediates:
    def refuse(r: Reader, at: int) -> tuple[int, int, int]:
        raise WasmFormatError(why.format(op=r.data[at], at=at))
    return refuse


def _no_memory(r: Reader) -> int:
    return -1


def _one_index(r: Reader) -> int:
    r.uleb()
    return -1


def _two_indices(r: Reader) -> int:
    r.uleb()
    r.uleb()
    return -1


def _memory_init(r: Reader) -> int:  # segment, memory
    r.uleb()
    return r.uleb()


def _memory_copy(r: Reader) -> int:  # destination memory, source memory
    dst = r.uleb()
    r.uleb()
    return dst


# 0xFC (saturating truncations, bulk memory, tables) sub-opcodes: each reads its
# immediates and gives the memory it writes (-1: none).
_FC_MEMIDX: dict[int, Callable[[Reader], int]] = {
    **dict.fromkeys(range(8), _no_memory),  # saturating truncations
    8: _memory_init, 10: _memory_copy, 11: Reader.uleb,  # memory.init, .copy, .fill
    **dict.fromkeys((12, 14), _two_indices),  # table.init, table.copy
    **dict.fromkeys((9, 13, 15, 16, 17), _one_index),  # drops, table.grow/size/fill
}


def _prefix_fc(r: Reader, at: int) -> tuple[int, int, int]:
    sub = r.uleb()
    memidx = _FC_MEMIDX.get(sub)
    if memidx is None:
        raise WasmFormatError(f"unsupported instruction 0xfc {sub} at offset {at}")
    return sub, memidx(r), 0


def _simd_lane_memarg(r: Reader) -> tuple[int, int]:
    memarg = _memarg(r)
    r.skip(1)
    return memarg


def _simd_bytes16(r: Reader) -> tuple[int, int]:
    r.skip(16)
    return -1, 0


def _simd_lane(r: Reader) -> tuple[int, int]:
    r.skip(1)
    return -1, 0


# SIMD (0xFD) sub-opcodes with immediates, giving (memory index, offset); every
# other SIMD op has none.
_FD_MEMARG: dict[int, Callable[[Reader], tuple[int, int]]] = {
    **dict.fromkeys([*range(0x00, 0x0C), 0x5C, 0x5D], _memarg),  # loads, stores
    **dict.fromkeys((0x0C, 0x0D), _simd_bytes16),  # v128.const, i8x16.shuffle
    **dict.fromkeys(range(0x15, 0x23), _simd_lane),  # extract/replace lane
    **dict.fromkeys(range(0x54, 0x5C), _simd_lane_memarg),  # load/store lane
}


def _prefix_fd(r: Reader, at: int) -> tuple[int, int, int]:
    sub = r.uleb()
    read = _FD_MEMARG.get(sub)
    memidx, offset = (-1, 0) if read is None else read(r)
    return sub, memidx, offset


def _immediates_table() -> list[_Immediates | None]:
    unknown = _refuse("unknown opcode 0x{op:02x} at offset {at}")
    # Single-byte opcodes in the range we decode that no proposal we accept
    # assigns are refused, rather than their immediates guessed.
    table: list[_Immediates | None] = [
        unknown if op > 0xD2 or op in (0x16, 0x17, 0x1D, 0x1E, 0x27) else None
        for op in range(256)]
    readers: dict[_Immediates, list[int] | range] = {
        _sleb(33): [0x02, 0x03, 0x04, 0xD0],  # block/loop/if block type; ref.null
        # 0x14/0x15: call_ref and return_call_ref (typed function references).
        _skip_uleb: [0x0C, 0x0D, 0x10, 0x12, 0x14, 0x15, 0x20, 0x21, 0x22, 0x23, 0x24,
                     0x25, 0x26, 0xD2],
        _memory_index: [0x3F, 0x40],
        _load_store: range(0x28, 0x3F),
        _br_table: [0x0E],
        _skip_uleb_pair: [0x11, 0x13],  # call_indirect / return_call_indirect
        _typed_select: [0x1C],
        _sleb(32): [0x41], _sleb(64): [0x42], _skip(4): [0x43], _skip(8): [0x44],
        _prefix_fc: [0xFC], _prefix_fd: [0xFD],
        _refuse("atomics (threads) are not supported (offset {at})"): [0xFE],
        _refuse("exception handling is not supported (offset {at})"):
            [0x06, 0x07, 0x08, 0x09, 0x18, 0x19, 0x1F, 0x0A],
    }
    for read, ops in readers.items():
        for op in ops:
            table[op] = read
    return table


_IMMEDIATES = _immediates_table()


def iter_instructions(r: Reader) -> Iterator[Instr]:
    """Decode every instruction up to `r.end`, immediates included, so that a byte
    inside an immediate is never taken for an opcode."""
    table = _IMMEDIATES
    while not r.at_end():
        at = r.pos
        op = r.byte()
        read = table[op]
        if read is None:
            yield Instr(at, r.pos, op)
        else:
            sub, memidx, offset = read(r, at)
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
