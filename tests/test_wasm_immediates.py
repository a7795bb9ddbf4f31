"""The instruction decoder's table of immediates: each kind of immediate is read
whole (the next instruction starts right after it), memory operands are found,
and what we do not support is refused with its offset."""

from __future__ import annotations

import pytest

from cloudlet.vm import wasm_binary as wb


def decode(code: bytes) -> list[tuple[int, int, int, int, int, int]]:
    return [(i.start, i.end, i.op, i.sub, i.memidx, i.offset)
            for i in wb.iter_instructions(wb.Reader(code))]


# (encoding of one instruction, (sub, memidx, offset)); an `end` (0x0b) follows each.
DECODED = [
    (b"\x01", (-1, -1, 0)),  # nop: no immediates
    (b"\x02\x40", (-1, -1, 0)),  # block, empty block type
    (b"\x04\x7f", (-1, -1, 0)),  # if (result i32)
    (b"\x20\x85\x01", (-1, -1, 0)),  # local.get 133 (two-byte LEB)
    (b"\x0e\x02\x00\x01\x00", (-1, -1, 0)),  # br_table [0 1] 0
    (b"\x11\x03\x00", (-1, -1, 0)),  # call_indirect type 3 table 0
    (b"\x1c\x01\x7f", (-1, -1, 0)),  # typed select i32
    (b"\x36\x02\x10", (-1, 0, 16)),  # i32.store align 2 offset 16
    (b"\x36\x42\x01\x08", (-1, 1, 8)),  # multi-memory: memory 1, offset 8
    (b"\x40\x00", (-1, 0, 0)),  # memory.grow 0
    (b"\x41\x7f", (-1, -1, 0)),  # i32.const -1
    (b"\x42\x80\x80\x80\x80\x80\x01", (-1, -1, 0)),  # i64.const, long
    (b"\x44" + bytes(8), (-1, -1, 0)),  # f64.const
    (b"\xfc\x00", (0, -1, 0)),  # i32.trunc_sat_f32_s
    (b"\xfc\x08\x05\x00", (8, 0, 0)),  # memory.init segment 5 memory 0
    (b"\xfc\x0a\x00\x00", (10, 0, 0)),  # memory.copy
    (b"\xfc\x0b\x00", (11, 0, 0)),  # memory.fill
    (b"\xfc\x0e\x00\x01", (14, -1, 0)),  # table.copy
    (b"\xfd\x0b\x04\x20", (11, 0, 32)),  # v128.store
    (b"\xfd\x0c" + bytes(16), (12, -1, 0)),  # v128.const
    (b"\xfd\x15\x03", (0x15, -1, 0)),  # i8x16.extract_lane_s 3
    (b"\xfd\x58\x00\x04\x02", (0x58, 0, 4)),  # v128.store8_lane offset 4 lane 2
    (b"\xfd\x7c", (0x7C, -1, 0)),  # a SIMD op without immediates
]


@pytest.mark.parametrize(("code", "operands"), DECODED, ids=[c.hex() for c, _ in DECODED])
def test_immediates_are_read_whole(code: bytes, operands: tuple[int, int, int]) -> None:
    first, end = decode(code + b"\x0b")
    assert first == (0, len(code), code[0], *operands)
    assert end == (len(code), len(code) + 1, 0x0B, -1, -1, 0)


@pytest.mark.parametrize(("code", "message"), [
    (b"\x01\x27", "unknown opcode 0x27 at offset 1"),
    (b"\xd3", "unknown opcode 0xd3 at offset 0"),
    (b"\x01\x01\xfe\x00", "atomics (threads) are not supported (offset 2)"),
    (b"\x06\x40", "exception handling is not supported (offset 0)"),
    (b"\xfc\x12", "unsupported instruction 0xfc 18 at offset 0"),
    (b"\x1c\x01\x7b\x1c\x01\x6e", "unsupported value type 0x6e"),
])
def test_what_is_not_supported_is_refused(code: bytes, message: str) -> None:
    with pytest.raises(wb.WasmFormatError, match=message.replace("(", r"\(").replace(")", r"\)")):
        decode(code)


def test_every_opcode_is_decoded_or_refused() -> None:
    """With enough zero bytes after it, any first byte either decodes or raises
    WasmFormatError: nothing else escapes the table."""
    for op in range(256):
        try:
            got = decode(bytes([op]) + bytes(20))
        except wb.WasmFormatError:
            continue
        assert got[0][2] == op and got[0][0] == 0


@pytest.mark.parametrize(("expr", "ok"), [
    (b"\x41\x2a\x0b", True),  # i32.const 42
    (b"\x23\x00\x41\x01\x6a\x0b", True),  # extended-const: global.get 0, i32.const 1, add
    (b"\xfd\x0c" + bytes(16) + b"\x0b", True),  # v128.const
    (b"\xfd\x0b\x00\x00\x0b", False),  # a SIMD store is no constant
    (b"\x20\x00\x0b", False),  # local.get
])
def test_constant_expressions(expr: bytes, ok: bool) -> None:
    r = wb.Reader(expr + b"\x99")
    if ok:
        wb.skip_const_expr(r)
        assert r.pos == len(expr)
    else:
        with pytest.raises(wb.WasmFormatError):
            wb.skip_const_expr(r)
