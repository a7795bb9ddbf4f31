"""Write tracking: rewrite a module so every store marks its 4 KiB chunk in a dirty bitmap.

Why: finding the chunks a guest changed by hashing all of its memory costs
time in proportion to memory size (~3.5-9 ms for 64 MiB here, one Python call
per chunk). Tracking writes as they happen makes it proportional to what was
written: the host reads a byte-per-chunk bitmap (16 KiB for 64 MiB) and
hashes only the marked chunks. Pre-copy migration scans every round, so this
is what keeps rounds short for big guests.

How: the bitmap is a second linear memory added to the module (16 pages, one
byte per chunk of a 4 GiB wasm32 memory; only touched pages cost RAM),
exported as `__cloudlet_dirty`. Every store to memory 0 becomes

    local.set $value ; local.set $addr
    bitmap[(addr + offset) >> 12] = 1            ; the store's first byte
    bitmap[(addr + offset + size - 1) >> 12] = 1 ; and its last (if size > 1)
    local.get $addr ; local.get $value ; <the original store>

and `memory.fill`, `memory.copy` and `memory.init` call an added function that
marks their destination range with one `memory.fill` on the bitmap. Address
arithmetic wraps at 32 bits; where it wraps, the original store traps anyway
(its effective address is past 4 GiB), so a stray mark is only a false positive.
The host marks its own writes into guest memory. Marks are a superset of the
chunks that changed: the host hashes marked chunks to find the ones that did.

Only single-memory modules are tracked (the bitmap's index is then 1); others
fall back to hashing.
"""

from __future__ import annotations

from cloudlet.vm import wasm_binary as wb

DIRTY_EXPORT = "__cloudlet_dirty"
BITMAP_PAGES = 16  # 2^20 chunks of 4 KiB = 4 GiB, one byte each = 16 wasm pages
CHUNK_SHIFT = 12

# Standard stores: opcode -> (bytes written, value type)
_STORES = {0x36: (4, "i32"), 0x37: (8, "i64"), 0x38: (4, "f32"), 0x39: (8, "f64"),
           0x3A: (1, "i32"), 0x3B: (2, "i32"), 0x3C: (1, "i64"), 0x3D: (2, "i64"),
           0x3E: (4, "i64")}
# SIMD stores (0xFD sub-opcode): v128.store and the four store-lane forms.
_SIMD_STORES = {0x0B: 16, 0x58: 1, 0x59: 2, 0x5A: 4, 0x5B: 8}
# Bulk memory ops (0xFC sub-opcode) whose destination is memory `memidx`.
_BULK_WRITES = {8, 10, 11}  # memory.init, memory.copy, memory.fill

# Locals appended to every function, in this order.
_LOCAL_TYPES = (0x7F, 0x7F, 0x7F, 0x7E, 0x7D, 0x7C, 0x7B)  # a, t1, t2, i64, f32, f64, v128
_VALUE_LOCAL = {"i32": 1, "i64": 3, "f32": 4, "f64": 5, "v128": 6}

_LOCAL_GET, _LOCAL_SET, _LOCAL_TEE, _I32_CONST, _CALL = 0x20, 0x21, 0x22, 0x41, 0x10
_I32_ADD, _I32_SHR_U = 0x6A, 0x76
_MARK_STORE8 = bytes([0x3A, 0x40, 0x01, 0x00])  # i32.store8 to memory 1, offset 0


def sleb_i32(value: int) -> bytes:
    """Signed LEB128 of a u32 taken as i32 (how i32.const stores it)."""
    value &= 0xFFFFFFFF
    if value >= 1 << 31:
        value -= 1 << 32
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if (value == 0 and not b & 0x40) or (value == -1 and b & 0x40):
            out.append(b)
            return bytes(out)
        out.append(b | 0x80)


def _mark(addr_local: bytes, offset: int) -> bytes:
    """bitmap[(addr + offset) >> 12] = 1"""
    return b"".join((
        bytes([_LOCAL_GET]), addr_local,
        bytes([_I32_CONST]), sleb_i32(offset), bytes([_I32_ADD]),
        bytes([_I32_CONST]), sleb_i32(CHUNK_SHIFT), bytes([_I32_SHR_U]),
        bytes([_I32_CONST, 0x01]), _MARK_STORE8,
    ))


def _mark_range_body() -> bytes:
    """(func (param $d i32) (param $n i32)): mark chunks of [d, d+n) unless the op will trap."""
    return bytes([
        0x00,  # no extra locals
        0x20, 0x01, 0x45, 0x04, 0x40, 0x0F, 0x0B,  # if n == 0: return
        # if u64(d) + u64(n) > memory.size(0) << 16: return (the real op traps)
        0x20, 0x00, 0xAD, 0x20, 0x01, 0xAD, 0x7C,
        0x3F, 0x00, 0xAD, 0x42, 0x10, 0x86, 0x56, 0x04, 0x40, 0x0F, 0x0B,
        # memory.fill(1, d >> 12, 1, ((d + n - 1) >> 12) - (d >> 12) + 1)
        0x20, 0x00, 0x41, 0x0C, 0x76,
        0x41, 0x01,
        0x20, 0x00, 0x20, 0x01, 0x6A, 0x41, 0x01, 0x6B, 0x41, 0x0C, 0x76,
        0x20, 0x00, 0x41, 0x0C, 0x76, 0x6B, 0x41, 0x01, 0x6A,
        0xFC, 0x0B, 0x01,
        0x0B,
    ])


def _rewrite_body(body: bytes, nparams: int, mark_range: int) -> bytes:
    r = wb.Reader(body)
    groups = r.uleb()
    after_count = r.pos
    nlocals = nparams
    for _ in range(groups):
        nlocals += r.uleb()
        wb.read_valtype(r)
    locals_end = r.pos
    local = [wb.uleb_encode(nlocals + i) for i in range(len(_LOCAL_TYPES))]
    addr, t1, t2 = local[0], local[1], local[2]

    out = bytearray(wb.uleb_encode(groups + len(_LOCAL_TYPES)))
    out += body[after_count:locals_end]
    for t in _LOCAL_TYPES:
        out += bytes([0x01, t])
    for ins in wb.iter_instructions(wb.Reader(body, locals_end)):
        original = body[ins.start : ins.end]
        size = 0
        value = ""
        if ins.op in _STORES and ins.memidx == 0:
            size, value = _STORES[ins.op]
        elif ins.op == 0xFD and ins.sub in _SIMD_STORES and ins.memidx == 0:
            size, value = _SIMD_STORES[ins.sub], "v128"
        if size:
            v = local[_VALUE_LOCAL[value]]
            out += bytes([_LOCAL_SET]) + v + bytes([_LOCAL_SET]) + addr
            out += _mark(addr, ins.offset)
            if size > 1:
                out += _mark(addr, ins.offset + size - 1)
            out += bytes([_LOCAL_GET]) + addr + bytes([_LOCAL_GET]) + v + original
        elif ins.op == 0xFC and ins.sub in _BULK_WRITES and ins.memidx == 0:
            # operands: dest, (value | source), length
            out += bytes([_LOCAL_SET]) + t2 + bytes([_LOCAL_SET]) + t1 + bytes([_LOCAL_TEE]) + addr
            out += bytes([_LOCAL_GET]) + t2 + bytes([_CALL]) + wb.uleb_encode(mark_range)
            out += (bytes([_LOCAL_GET]) + addr + bytes([_LOCAL_GET]) + t1
                    + bytes([_LOCAL_GET]) + t2 + original)
        else:
            out += original
    return bytes(out)


def add_write_tracking(sections: list[wb.Section], imported_funcs: int) -> list[wb.Section]:
    """Return the sections of a module whose single memory's writes are tracked."""
    by_id = {s.id: s for s in sections if s.id != wb.SEC_CUSTOM}
    type_params, new_types = _types_with_mark(by_id.get(wb.SEC_TYPE))
    func_types = _function_types(by_id.get(wb.SEC_FUNCTION))
    mark_type = len(type_params)
    mark_range = imported_funcs + len(func_types)
    new_funcs = wb.uleb_encode(len(func_types) + 1) + b"".join(
        wb.uleb_encode(t) for t in [*func_types, mark_type])
    new_code = _tracked_code(by_id.get(wb.SEC_CODE), func_types, type_params, mark_range)
    replaced = {wb.SEC_TYPE: new_types, wb.SEC_FUNCTION: new_funcs, wb.SEC_CODE: new_code,
                wb.SEC_MEMORY: _memories_with_bitmap(by_id[wb.SEC_MEMORY])}
    present = {s.id for s in sections}
    for sec_id in (wb.SEC_TYPE, wb.SEC_FUNCTION, wb.SEC_CODE):
        if sec_id not in present:  # keep the canonical order when adding a section
            sections = _insert(sections, wb.Section(sec_id, b"", 0))
    return [wb.Section(s.id, replaced[s.id], s.offset) if s.id in replaced else s
            for s in sections]


def _types_with_mark(section: wb.Section | None) -> tuple[list[int], bytes]:
    """The parameter count of every function type, and the type section with one
    type added: (i32, i32) -> (), the mark-range function's."""
    type_params: list[int] = []
    type_entries = b""
    if section is not None:
        types = wb.Reader(section.payload)
        count = types.uleb()
        after_count = types.pos
        for _ in range(count):
            type_params.append(_function_type_params(types))
        type_entries = bytes(types.data[after_count:])
    new_types = (wb.uleb_encode(len(type_params) + 1) + type_entries
                 + bytes([0x60, 0x02, 0x7F, 0x7F, 0x00]))
    return type_params, new_types


def _function_type_params(types: wb.Reader) -> int:
    form = types.byte()
    if form != 0x60:
        raise wb.WasmFormatError(f"unsupported type form 0x{form:02x} (GC types)")
    n = types.uleb()
    for _ in range(n):
        wb.read_valtype(types)
    for _ in range(types.uleb()):
        wb.read_valtype(types)
    return n


def _function_types(section: wb.Section | None) -> list[int]:
    """The type index of every function the module defines."""
    if section is None:
        return []
    funcs = wb.Reader(section.payload)
    return [funcs.uleb() for _ in range(funcs.uleb())]


def _tracked_code(section: wb.Section | None, func_types: list[int], type_params: list[int],
                  mark_range: int) -> bytes:
    """The code section with every body's stores marking, and the mark-range
    function's body added last."""
    bodies: list[bytes] = []
    if section is not None:
        code = wb.Reader(section.payload)
        if code.uleb() != len(func_types):
            raise wb.WasmFormatError("the code and function sections count different functions")
        for i, type_index in enumerate(func_types):
            if type_index >= len(type_params):
                raise wb.WasmFormatError(f"function {i} has type {type_index}, past the types")
            size = code.uleb()
            body = code.bytes(size)
            bodies.append(_rewrite_body(body, type_params[type_index], mark_range))
    bodies.append(_mark_range_body())
    return wb.uleb_encode(len(bodies)) + b"".join(wb.uleb_encode(len(b)) + b for b in bodies)


def _memories_with_bitmap(section: wb.Section) -> bytes:
    """The memory section with the bitmap added as memory 1."""
    mem = wb.Reader(section.payload)
    if mem.uleb() != 1:
        raise wb.WasmFormatError("write tracking needs exactly one memory")
    return (wb.uleb_encode(2) + bytes(mem.data[mem.pos :])
            + bytes([0x01]) + wb.uleb_encode(BITMAP_PAGES) + wb.uleb_encode(BITMAP_PAGES))


def _insert(sections: list[wb.Section], new: wb.Section) -> list[wb.Section]:
    rank = wb.SECTION_ORDER.index(new.id)
    for i, s in enumerate(sections):
        if s.id != wb.SEC_CUSTOM and wb.SECTION_ORDER.index(s.id) > rank:
            return [*sections[:i], new, *sections[i:]]
    return [*sections, new]
