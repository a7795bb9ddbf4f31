"""Checks of the guest workloads (workloads/*.wasm) against reference models.

Run by tests/test_workloads.py. Checks, for every module:
  * it imports nothing outside the allowed WASI preview1 subset;
  * it exports the documented functions with the documented signatures;
  * the common ABI (cloudlet_input, noop, add) and the bytes convention work;
  * the workload's behaviour matches a small Python reference model, and is
    deterministic (two fresh instances fed the same calls agree).
Each check raises (AssertionError, or a wasmtime trap it did not expect) on a
mismatch. They drive raw wasmtime, not `cloudlet.vm`: what they check is the
guests themselves, whatever host runs them.
"""
from __future__ import annotations

import os
import random
import struct

import wasmtime

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workloads")

ALLOWED_WASI = {
    "args_get", "args_sizes_get", "environ_get", "environ_sizes_get",
    "clock_time_get", "clock_res_get", "random_get", "fd_write", "fd_close",
    "fd_seek", "fd_fdstat_get", "proc_exit", "sched_yield",
}

I32, I64 = "i32", "i64"
COMMON_EXPORTS = {
    "cloudlet_input": ([I32], [I32]),
    "noop": ([], []),
    "add": ([I32, I32], [I32]),
}
EXPORTS = {
    "vdi": {
        "vdi_init": ([I32, I32], [I32]),
        "vdi_key": ([I32], [I32]),
        "vdi_click": ([I32, I32], [I32]),
        "vdi_move": ([I32, I32], [I32]),
        "vdi_events": ([I32, I32], [I64]),
        "vdi_frame": ([], [I32]),
        "vdi_checksum": ([], [I32]),
    },
    "filter": {
        "filter_blur": ([I32, I32], [I64]),
        "filter_frame": ([I32, I32, I32], [I32]),
        "filter_frames": ([], [I32]),
        "filter_state": ([], [I32]),
    },
    "kvstore": {
        "kv_put": ([I32, I32], [I32]),
        "kv_get": ([I32], [I32]),
        "kv_has": ([I32], [I32]),
        "kv_del": ([I32], [I32]),
        "kv_count": ([], [I32]),
        "kv_checksum": ([], [I32]),
        "kv_set": ([I32, I32], [I64]),
        "kv_lookup": ([I32, I32], [I64]),
        "kv_bytes_count": ([], [I32]),
        "kv_bytes_checksum": ([], [I32]),
    },
    "memhog": {
        "hog_grow": ([I32], [I32]),
        "hog_dirty": ([I32, I32], [I32]),
        "hog_fill": ([I32, I32, I32], [I32]),
        "hog_checksum": ([], [I32]),
        "hog_mib": ([], [I32]),
        "hog_pages": ([], [I32]),
        "hog_base": ([], [I32]),
        "hog_bomb": ([], [I32]),
        "hog_spin": ([], []),
        "hog_trap": ([I32], [I32]),
        "hog_recurse": ([I32], [I32]),
    },
}

M32 = 0xFFFFFFFF


def s32(x: int) -> int:
    x &= M32
    return x - (1 << 32) if x & 0x80000000 else x


def fnv1a(data: bytes, h: int = 2166136261) -> int:
    for b in data:
        h = ((h ^ b) * 16777619) & M32
    return h


def fnv1a_u32(h: int, v: int) -> int:
    return fnv1a(struct.pack("<I", v & M32), h)


def seed32(seed: int) -> int:
    s = (seed ^ 0x9E3779B9) & M32
    return s or 0x6D2B79F5


def xorshift32(s: int) -> int:
    s ^= (s << 13) & M32
    s ^= s >> 17
    s ^= (s << 5) & M32
    return s


def valtype(t) -> str:
    return str(t)


# ---------------------------------------------------------------------------
# Host side of the ABI
# ---------------------------------------------------------------------------

_engines: dict = {}


def engine(fuel: bool = False) -> wasmtime.Engine:
    if fuel not in _engines:
        cfg = wasmtime.Config()
        cfg.consume_fuel = fuel
        _engines[fuel] = wasmtime.Engine(cfg)
    return _engines[fuel]


_modules: dict = {}


def module(name: str, fuel: bool = False) -> wasmtime.Module:
    key = (name, fuel)
    if key not in _modules:
        _modules[key] = wasmtime.Module.from_file(
            engine(fuel), os.path.join(HERE, name + ".wasm"))
    return _modules[key]


class Guest:
    """One instance of a workload, with helpers for both call conventions."""

    def __init__(self, name: str, fuel: int | None = None,
                 memory_limit: int | None = None):
        eng = engine(fuel is not None)
        mod = module(name, fuel is not None)
        self.store = wasmtime.Store(eng)
        if fuel is not None:
            self.store.set_fuel(fuel)
        if memory_limit is not None:
            self.store.set_limits(memory_size=memory_limit)
        if mod.imports:
            linker = wasmtime.Linker(eng)
            linker.define_wasi()
            self.store.set_wasi(wasmtime.WasiConfig())
            self.instance = linker.instantiate(self.store, mod)
        else:
            self.instance = wasmtime.Instance(self.store, mod, [])
        self.exports = self.instance.exports(self.store)
        self.memory = self.exports["memory"]
        if "_initialize" in self.exports:
            self.exports["_initialize"](self.store)

    def __call__(self, fn: str, *args):
        return self.exports[fn](self.store, *args)

    def read(self, ptr: int, n: int) -> bytes:
        return bytes(self.memory.read(self.store, ptr, ptr + n))

    def mem_size(self) -> int:
        return self.memory.data_len(self.store)

    def bytes_call(self, fn: str, data: bytes) -> bytes:
        ptr = self("cloudlet_input", len(data))
        assert ptr != 0, "cloudlet_input could not allocate"
        if data:
            self.memory.write(self.store, data, ptr)
        packed = self(fn, ptr, len(data)) & 0xFFFFFFFFFFFFFFFF
        out_ptr, out_len = packed >> 32, packed & M32
        assert out_ptr + out_len <= self.mem_size(), "output out of bounds"
        return self.read(out_ptr, out_len)


def expect_trap(fn, *args, code=None):
    try:
        fn(*args)
    except wasmtime.Trap as e:
        if code is not None:
            assert e.trap_code == code, f"trap code {e.trap_code}, want {code}"
        return e
    except wasmtime.WasmtimeError as e:
        if code is None:
            return e
        raise
    raise AssertionError("expected a trap")


# ---------------------------------------------------------------------------
# Module-level checks
# ---------------------------------------------------------------------------

def check_module_shape(name: str) -> None:
    mod = module(name)
    for imp in mod.imports:
        assert imp.module == "wasi_snapshot_preview1" and imp.name in ALLOWED_WASI, \
            f"{name}: forbidden import {imp.module}.{imp.name}"
    exports = {e.name: e.type for e in mod.exports}
    assert "memory" in exports, f"{name}: no memory export"
    want = dict(COMMON_EXPORTS, **EXPORTS[name])
    for fn, (params, results) in want.items():
        assert fn in exports, f"{name}: missing export {fn}"
        ft = exports[fn]
        assert isinstance(ft, wasmtime.FuncType), f"{name}.{fn} is not a function"
        got = ([valtype(t) for t in ft.params], [valtype(t) for t in ft.results])
        assert got == (params, results), f"{name}.{fn}: signature {got}, want {(params, results)}"


def check_common(name: str) -> None:
    g = Guest(name)
    assert g("noop") is None
    assert g("add", 2, 3) == 5
    assert g("add", -7, 3) == -4
    assert g("add", 0x7FFFFFFF, 1) == -0x80000000  # wraps, no trap
    assert g("cloudlet_input", -1) == 0
    p0 = g("cloudlet_input", 0)
    assert p0 != 0
    p = g("cloudlet_input", 1000)
    assert p != 0 and p + 1000 <= g.mem_size()


# ---------------------------------------------------------------------------
# vdi
# ---------------------------------------------------------------------------

def ev(t: int, a: int, b: int = 0) -> bytes:
    return struct.pack("<BHH", t, a, b)


def decode_rects(out: bytes):
    assert len(out) >= 2
    (n,) = struct.unpack_from("<H", out)
    assert len(out) == 2 + 8 * n, (len(out), n)
    return [struct.unpack_from("<HHHH", out, 2 + 8 * i) for i in range(n)]


def check_vdi() -> None:
    g = Guest("vdi")
    # Lazy init: usable without vdi_init, defaults to 256x192.
    c0 = g("vdi_checksum")
    assert g("vdi_frame") == 0
    assert g("vdi_init", 0, 10) == -1 and g("vdi_init", 10, 1025) == -1
    assert g("vdi_init", 256, 192) == 256 * 192
    assert g("vdi_checksum") == c0, "lazy init differs from explicit default init"

    # Typing: adjacent glyph cells merge into one strip.
    assert g("vdi_key", ord("a")) == 1
    assert g("vdi_key", ord("b")) == 1
    assert g("vdi_key", ord("c")) == 1
    assert decode_rects(g.bytes_call("vdi_events", b"")) == [(0, 0, 24, 8)]
    assert g("vdi_frame") == 0

    # Clicks: separate regions, clipped at the screen edge, XOR is an involution.
    before = g("vdi_checksum")
    assert g("vdi_click", 100, 100) == 1
    assert g("vdi_click", 250, 190) == 2
    assert g("vdi_checksum") != before
    rects = decode_rects(g.bytes_call("vdi_events", ev(2, 100, 100) + ev(2, 250, 190)))
    assert rects == [(100, 100, 16, 16), (250, 190, 6, 2)], rects
    assert g("vdi_checksum") == before
    assert g("vdi_click", 5000, 5000) == 0  # fully off-screen: nothing dirty

    # Pointer: erase + draw; moving away and back restores the pixels under it.
    assert g("vdi_move", 10, 10) == 1
    assert g("vdi_move", 40, 10) == 2
    g("vdi_frame")
    cs_at_40 = g("vdi_checksum")
    g("vdi_move", 10, 10)
    g("vdi_click", 8, 8)   # draw under the sprite: must stay consistent
    g("vdi_click", 8, 8)
    g("vdi_move", 40, 10)
    assert g("vdi_checksum") == cs_at_40
    g("vdi_frame")

    # Wrap and scroll: 32 columns x 24 rows of text; one more line scrolls,
    # which dirties the whole screen.
    g("vdi_init", 256, 192)
    for i in range(32 * 23):
        g("vdi_key", 33 + i % 90)
    assert g("vdi_frame") >= 1
    for i in range(32):
        g("vdi_key", 65 + i % 26)
    rects = decode_rects(g.bytes_call("vdi_events", b""))
    assert rects == [(0, 0, 256, 192)], rects

    # Events == individual calls, unknown types skipped, partial tail ignored;
    # determinism across instances.
    rnd = random.Random(1)
    evs = []
    for _ in range(500):
        t = rnd.choice([1, 2, 3, 9])
        evs.append((t, rnd.randrange(0, 300), rnd.randrange(0, 220)))
    g1, g2 = Guest("vdi"), Guest("vdi")
    batch = b"".join(ev(*e) for e in evs) + b"\x01\x02"
    for chunk in range(0, len(evs), 50):
        part = b"".join(ev(*e) for e in evs[chunk:chunk + 50])
        for x, y, w, h in decode_rects(g1.bytes_call("vdi_events", part)):
            assert w > 0 and h > 0 and x + w <= 256 and y + h <= 192
    for t, a, b in evs:
        if t == 1:
            g2("vdi_key", a)
        elif t == 2:
            g2("vdi_click", a, b)
        elif t == 3:
            g2("vdi_move", a, b)
    assert g1("vdi_checksum") == g2("vdi_checksum")
    g3 = Guest("vdi")
    out = g3.bytes_call("vdi_events", batch)
    assert len(decode_rects(out)) <= 32
    assert g3("vdi_checksum") == g1("vdi_checksum")
    assert g3("vdi_frame") == 0

    # Other sizes, including tiny screens.
    for w, h in [(1, 1), (7, 5), (1024, 1024), (8, 8)]:
        assert g("vdi_init", w, h) == w * h
        for i in range(20):
            g("vdi_key", 40 + i)
            g("vdi_click", i, i)
            g("vdi_move", i * 3, i * 2)
        for x, y, rw, rh in decode_rects(g.bytes_call("vdi_events", ev(1, 10))):
            assert x + rw <= w and y + rh <= h
        g("vdi_checksum")
    # Bad (ptr, len) is an empty answer, not a trap.
    assert g("vdi_events", 0x7FFFFFF0, 100) == 0


# ---------------------------------------------------------------------------
# filter
# ---------------------------------------------------------------------------

def ref_blur(w: int, h: int, px: bytes) -> bytes:
    out = bytearray(w * h)
    for y in range(h):
        ys = range(max(0, y - 1), min(h, y + 2))
        for x in range(w):
            xs = range(max(0, x - 1), min(w, x + 2))
            s = sum(px[r * w + c] for r in ys for c in xs)
            n = len(ys) * len(xs)
            out[y * w + x] = (s + n // 2) // n
    return bytes(out)


def ref_frame(w: int, h: int, seed: int) -> bytes:
    n = w * h
    s = seed32(seed)
    out = bytearray()
    while len(out) < n:
        s = xorshift32(s)
        out += struct.pack("<I", s)
    return bytes(out[:n])


def check_filter() -> None:
    g = Guest("filter")
    rnd = random.Random(2)
    assert g("filter_frames") == 0
    frames = 0
    for w, h in [(1, 1), (2, 1), (1, 3), (3, 3), (17, 9), (64, 48)]:
        px = bytes(rnd.randrange(256) for _ in range(w * h))
        out = g.bytes_call("filter_blur", struct.pack("<HH", w, h) + px)
        assert out[:4] == struct.pack("<HH", w, h)
        assert out[4:] == ref_blur(w, h, px), (w, h)
        frames += 1
    assert g("filter_frames") == frames
    # Malformed input: empty output, not counted.
    for bad in [b"", b"\x01\x00", struct.pack("<HH", 4, 4) + b"x" * 15,
                struct.pack("<HH", 0, 4), struct.pack("<HH", 2, 2) + b"x" * 5]:
        assert g.bytes_call("filter_blur", bad) == b""
    assert g("filter_frames") == frames

    # filter_frame == reference generator + blur + FNV-1a.
    for w, h, seed in [(16, 16, 1), (33, 7, 0), (5, 1, -5)]:
        want = fnv1a(ref_blur(w, h, ref_frame(w, h, seed)))
        assert g("filter_frame", w, h, seed) & M32 == want, (w, h, seed)
    assert g("filter_frames") == frames + 3
    # Clamping and a full-size frame.
    a = g("filter_frame", 0, -3, 9)
    assert a & M32 == fnv1a(ref_blur(1, 1, ref_frame(1, 1, 9)))
    big = g("filter_frame", 5000, 1024, 3)
    assert big == g("filter_frame", 1024, 1024, 3)

    # Bytes path and numeric path agree on the running state.
    g1, g2 = Guest("filter"), Guest("filter")
    for seed in range(4):
        g1("filter_frame", 40, 30, seed)
        g2.bytes_call("filter_blur", struct.pack("<HH", 40, 30) + ref_frame(40, 30, seed))
    assert g1("filter_state") == g2("filter_state") != 0
    assert g1("filter_frames") == g2("filter_frames") == 4

    # Feeding the previous output straight back in (zero-copy chaining).
    w, h = 20, 10
    px = bytes(rnd.randrange(256) for _ in range(w * h))
    first = g.bytes_call("filter_blur", struct.pack("<HH", w, h) + px)
    assert g("filter_blur", 0, 0) == 0  # empty input: empty output
    ptr = g("cloudlet_input", len(first))
    g.memory.write(g.store, first, ptr)
    p1 = g("filter_blur", ptr, len(first)) & 0xFFFFFFFFFFFFFFFF
    p2 = g("filter_blur", p1 >> 32, p1 & M32) & 0xFFFFFFFFFFFFFFFF
    second = g.read(p2 >> 32, p2 & M32)
    assert second[4:] == ref_blur(w, h, ref_blur(w, h, first[4:]))


# ---------------------------------------------------------------------------
# kvstore
# ---------------------------------------------------------------------------

def check_kvstore() -> None:
    g = Guest("kvstore")
    assert g("kv_count") == 0 and g("kv_get", 1) == -1 and g("kv_has", 1) == 0
    rnd = random.Random(3)
    ref: dict[int, int] = {}
    for _ in range(20000):
        op = rnd.random()
        k = rnd.randrange(-3000, 3000)
        if op < 0.6:
            v = rnd.randrange(-2**31, 2**31)
            assert g("kv_put", k, v) == (0 if k in ref else 1)
            ref[k] = v
        elif op < 0.8:
            assert g("kv_del", k) == (1 if k in ref else 0)
            ref.pop(k, None)
        else:
            assert g("kv_has", k) == (k in ref)
            assert g("kv_get", k) == ref.get(k, -1)
    assert g("kv_count") == len(ref)
    for k, v in ref.items():
        assert g("kv_get", k) == v

    # Order-independent checksum: same pairs inserted differently agree.
    g2 = Guest("kvstore")
    items = list(ref.items())
    rnd.shuffle(items)
    for k, v in items:
        g2("kv_put", k, v ^ 1)
    for k, v in items:
        g2("kv_put", k, v)
    g2("kv_put", 99999, 1)
    g2("kv_del", 99999)
    assert g2("kv_checksum") == g("kv_checksum")
    g2("kv_put", items[0][0], items[0][1] + 1)
    assert g2("kv_checksum") != g("kv_checksum")

    # Bytes table.
    bref: dict[bytes, bytes] = {}
    keys = [b"", b"a", b"key", b"\x00\xff\x01", b"long" * 100, b"k\n"]
    for _ in range(3000):
        k = rnd.choice(keys) + (b"%d" % rnd.randrange(50) if rnd.random() < 0.7 else b"")
        if rnd.random() < 0.6:
            v = bytes(rnd.randrange(256) for _ in range(rnd.choice([0, 1, 5, 300])))
            if rnd.random() < 0.2:
                v += b"=x=y"
            prev = g.bytes_call("kv_set", k + b"=" + v)
            assert prev == bref.get(k, b""), (k, prev)
            bref[k] = v
        else:
            assert g.bytes_call("kv_lookup", k) == bref.get(k, b"")
    assert g("kv_bytes_count") == len(bref)
    # No '=' is ignored.
    assert g.bytes_call("kv_set", b"novalue") == b""
    assert g("kv_bytes_count") == len(bref)
    assert g.bytes_call("kv_lookup", b"novalue") == b""
    # Bytes checksum is order independent too.
    g3 = Guest("kvstore")
    bitems = list(bref.items())
    rnd.shuffle(bitems)
    for k, v in bitems:
        g3.bytes_call("kv_set", k + b"=" + v)
    assert g3("kv_bytes_checksum") == g("kv_bytes_checksum")
    assert g("kv_set", 0x7FFFFFF0, 64) == 0


# ---------------------------------------------------------------------------
# memhog
# ---------------------------------------------------------------------------

PAGE = 4096


def changed_pages(a: bytes, b: bytes) -> list[int]:
    return [i for i in range(len(a) // PAGE)
            if a[i * PAGE:(i + 1) * PAGE] != b[i * PAGE:(i + 1) * PAGE]]


def ref_hog_checksum(region: bytes) -> int:
    n = len(region) // PAGE
    h = fnv1a_u32(2166136261, n)
    for i in range(n):
        for w in struct.unpack_from("<8I", region, i * PAGE):
            h = ((h ^ w) * 16777619) & M32
    return h


def ref_recurse(n: int) -> int:
    r = 1
    for i in range(1, n + 1):
        r = (r * 3 + (i & 7) + 1) & M32
    return s32(r)


def check_memhog() -> None:
    g = Guest("memhog")
    assert g("hog_dirty", 10, 1) == -1
    assert g("hog_mib") == 0 and g("hog_pages") == 0 and g("hog_base") == 0
    before = g.mem_size()
    assert g("hog_grow", -1) == -1 and g("hog_grow", 5000) == -1
    total = g("hog_grow", 4)
    assert total == g.mem_size() // (1 << 20) and g.mem_size() == before + (4 << 20)
    base = g("hog_base")
    assert base == before and g("hog_mib") == 4 and g("hog_pages") == 1024
    assert g("hog_grow", 2) == total  # already big enough: no growth
    region = g.read(base, 4 << 20)
    assert region == bytes(len(region)), "fresh hog pages must stay zero"
    assert g("hog_checksum") & M32 == ref_hog_checksum(region)

    # hog_dirty touches exactly npages distinct 4 KiB pages; a repeated seed
    # hits the same pages with new values.
    c1 = g("hog_dirty", 100, 42)
    r1 = g.read(base, 4 << 20)
    p1 = changed_pages(region, r1)
    assert len(p1) == 100, len(p1)
    assert g("hog_checksum") & M32 == ref_hog_checksum(r1)
    c2 = g("hog_dirty", 100, 42)
    r2 = g.read(base, 4 << 20)
    assert changed_pages(r1, r2) == p1 and c1 != c2
    assert len(changed_pages(region, g.read(base, 4 << 20))) == 100
    g("hog_dirty", 1024, 7)  # all pages, still distinct
    assert len(changed_pages(region, g.read(base, 4 << 20))) == 1024
    g("hog_dirty", 3000, 8)  # more than the region: wraps, no crash

    # hog_fill: whole words, clipped.
    assert g("hog_fill", 1020, 10, 0x01020304) == 4
    assert g("hog_fill", -5, 6, 0) == 1
    assert g("hog_fill", 5000, 3, 1) == 0
    tail = g.read(base + 1020 * PAGE, 4 * PAGE)
    assert tail == struct.pack("<I", 0x01020304) * (PAGE // 4 * 4)
    assert g.read(base, PAGE) == bytes(PAGE)
    assert g("hog_checksum") & M32 == ref_hog_checksum(g.read(base, 4 << 20))

    # Determinism across instances.
    h1, h2 = Guest("memhog"), Guest("memhog")
    for h in (h1, h2):
        h("hog_grow", 2)
        for s in range(5):
            h("hog_dirty", 50, s)
        h("hog_fill", 3, 2, 9)
    assert h1("hog_checksum") == h2("hog_checksum")

    # Growing further keeps the region contiguous.
    assert g("hog_grow", 6) == g.mem_size() >> 20 and g("hog_mib") == 6
    assert g("hog_base") == base

    # Misbehaviour.
    assert g("hog_trap", 0) == 7
    expect_trap(g, "hog_trap", 1, code=wasmtime.TrapCode.UNREACHABLE)
    assert g("hog_trap", 0) == 7
    assert g("hog_recurse", 0) == 1
    assert g("hog_recurse", 1000) == ref_recurse(1000)
    expect_trap(g, "hog_recurse", 50_000_000, code=wasmtime.TrapCode.STACK_OVERFLOW)
    assert g("hog_recurse", 10) == ref_recurse(10)

    limit = 64 << 20
    b = Guest("memhog", memory_limit=limit)
    pages = b("hog_bomb")
    assert pages == limit // 65536 == b.mem_size() // 65536, pages
    assert b("hog_mib") >= 60
    assert b("hog_grow", 100) == -1
    b("hog_dirty", 10, 1)

    s = Guest("memhog", fuel=5_000_000)
    assert s("add", 1, 2) == 3
    expect_trap(s, "hog_spin", code=wasmtime.TrapCode.OUT_OF_FUEL)


# ---------------------------------------------------------------------------
