"""Images: wasm modules named by the SHA-256 of their bytes, validated once, compiled once.

Like a cloudlet's cache of VM base images, the store keeps each image by digest:
the original bytes, the instrumented module compiled for this engine (keyed by
digest and engine fingerprint, so a wasmtime upgrade recompiles instead of
loading stale code), and metadata including the image's pristine boot state as
chunk digests, which overlays are taken against. Loading a known image back is
a `Module.deserialize_file` (~30 us) plus one small msgpack file.

Compiled artifacts are trusted code: the store directory must be writable only
by the daemon's user.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import threading
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import wasmtime

from cloudlet.errors import ImageNotFound, ImageRejected, ImageTooLarge, StorageFull, VMError
from cloudlet.fsutil import atomic_write
from cloudlet.vm import chunks
from cloudlet.vm.compiled import BOOT_DEADLINE_MS, BOOT_FUEL, FuncSig, Image
from cloudlet.vm.engine import Runtime, default_runtime
from cloudlet.vm.instrument import GlobalInfo, MemoryInfo, instrument
from cloudlet.vm.limits import VMLimits
from cloudlet.vm.machine import VM
from cloudlet.vm.memory import PristineMemory

MAX_IMAGE_BYTES = 16 * 1024 * 1024  # clang -O2 guests are KiBs to a few MiB; 16 MiB is generous
META_FORMAT = 2
_NUMERIC = ("i32", "i64", "f32", "f64")
WASMTIME_VERSION = importlib.metadata.version("wasmtime")


def image_digest(wasm: bytes) -> str:
    return hashlib.sha256(wasm).hexdigest()


def default_store_dir() -> Path:
    env = os.environ.get("CLOUDLET_HOME")
    base = Path(env) if env else Path.home() / ".cache" / "cloudlet"
    return base / "images"


class ImageStore:
    """Validates, compiles and caches images under `root`; thread-safe."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *,
                 max_image_bytes: int = MAX_IMAGE_BYTES, runtime: Runtime | None = None,
                 track_writes: bool = True, boot_fuel: int = BOOT_FUEL,
                 boot_deadline_ms: int = BOOT_DEADLINE_MS) -> None:
        self.root = Path(root) if root is not None else default_store_dir()
        self.max_image_bytes = max_image_bytes
        # What one boot of an image may cost (fuel, wall clock); an image whose
        # `_initialize` needs more is refused at registration.
        self.boot_fuel = boot_fuel
        self.boot_deadline_ms = boot_deadline_ms
        self.runtime = runtime or default_runtime()
        self._loaded: dict[str, Image] = {}
        self._lock = threading.Lock()
        # Write tracking costs guest stores some speed for O(written) dirty detection;
        # see cloudlet/vm/write_tracking.py and the benchmark's figures.
        self.track_writes = track_writes
        mode = "tracked" if track_writes else "hashed"
        fingerprint = f"{WASMTIME_VERSION}-{self.runtime.fingerprint}-{mode}"
        self._compiled_dir = self.root / "compiled" / fingerprint
        self._wasm_dir = self.root / "wasm"

    # --- paths --------------------------------------------------------------------

    def _wasm_path(self, digest: str) -> Path:
        return self._wasm_dir / f"{digest}.wasm"

    def _cwasm_path(self, digest: str) -> Path:
        return self._compiled_dir / f"{digest}.cwasm"

    def _meta_path(self, digest: str) -> Path:
        return self._compiled_dir / f"{digest}.meta"

    # --- public API -----------------------------------------------------------------

    def add(self, wasm: bytes) -> Image:
        """Register an image (idempotent); raise ImageRejected/ImageTooLarge if it is bad."""
        if len(wasm) > self.max_image_bytes:
            raise ImageTooLarge(f"image is {len(wasm)} bytes; the limit is "
                                f"{self.max_image_bytes} bytes")
        digest = image_digest(wasm)
        with self._lock:
            image = self._loaded.get(digest) or self._load_compiled(digest)
            if image is None:
                image = self._compile(digest, wasm)
            self._loaded[digest] = image
            return image

    def add_file(self, path: str | os.PathLike[str]) -> Image:
        p = Path(path)
        try:
            size = p.stat().st_size
        except OSError as exc:
            raise ImageNotFound(f"cannot read image file {p}: {exc.strerror}") from None
        if size > self.max_image_bytes:
            raise ImageTooLarge(f"{p} is {size} bytes; the limit is {self.max_image_bytes} bytes")
        return self.add(p.read_bytes())

    def get(self, digest: str) -> Image:
        """An image already in the store, by digest."""
        with self._lock:
            image = self._loaded.get(digest)
            if image is None:
                image = self._load_compiled(digest)
                if image is None:
                    wasm_path = self._wasm_path(digest)
                    if not _is_digest(digest) or not wasm_path.exists():
                        raise ImageNotFound(f"image {digest} is not in the store at {self.root}")
                    image = self._compile(digest, wasm_path.read_bytes())
                self._loaded[digest] = image
            return image

    def wasm_bytes(self, digest: str) -> bytes:
        """The image's original module, as uploaded (to send it to another cloudlet)."""
        path = self._wasm_path(digest)
        if not _is_digest(digest) or not path.exists():
            raise ImageNotFound(f"no image {digest[:12]} in {self.root}")
        return path.read_bytes()

    def __contains__(self, digest: str) -> bool:
        return digest in self._loaded or (_is_digest(digest) and self._wasm_path(digest).exists())

    def list(self) -> list[str]:
        if not self._wasm_dir.exists():
            return []
        return sorted(p.stem for p in self._wasm_dir.glob("*.wasm") if _is_digest(p.stem))

    def delete(self, digest: str) -> None:
        if digest not in self:
            raise ImageNotFound(f"image {digest} is not in the store")
        with self._lock:
            self._loaded.pop(digest, None)
            for p in (self._wasm_path(digest), self._cwasm_path(digest), self._meta_path(digest)):
                p.unlink(missing_ok=True)

    # --- internals ------------------------------------------------------------------

    def _compile(self, digest: str, wasm: bytes) -> Image:
        engine = self.runtime.engine
        if wasm[:4] != b"\x00asm":
            raise ImageRejected("not a WebAssembly module (no \\0asm magic number)")
        try:
            wasmtime.Module.validate(engine, wasm)
        except wasmtime.WasmtimeError as exc:
            raise ImageRejected(f"invalid WebAssembly module: {_first_line(exc)}") from None
        inst = instrument(wasm, track_writes=self.track_writes)
        try:
            module = wasmtime.Module(engine, inst.wasm)
        except wasmtime.WasmtimeError as exc:
            if inst.dirty_export is None:
                raise ImageRejected(f"module does not compile: {_first_line(exc)}") from None
            # Tracking adds locals and code; a module at an engine limit (e.g. 50,000
            # locals in a function) may only fit without it: fall back to hashing.
            inst = instrument(wasm, track_writes=False)
            try:
                module = wasmtime.Module(engine, inst.wasm)
            except wasmtime.WasmtimeError as exc2:
                raise ImageRejected(f"module does not compile: {_first_line(exc2)}") from None
        image = self._make_image(digest, len(wasm), module, inst.memories, inst.globals,
                                 inst.imports, _functions_of(module), inst.dirty_export)
        image.pristine = self._boot_pristine(image)
        # The module is the image: a VM made from it cannot be restored without it, so
        # an upload the disk cannot take fails (StorageFull).
        if not self._wasm_path(digest).exists():
            atomic_write(self._wasm_path(digest), wasm)
        # The compiled module and its metadata are a cache, rebuilt from the module when
        # missing: a full disk must not stop an image from loading, nor a restart (say
        # after a wasmtime upgrade) from restoring the VMs made from it.
        with contextlib.suppress(StorageFull):
            atomic_write(self._cwasm_path(digest), bytes(module.serialize()))
            atomic_write(self._meta_path(digest), msgpack.packb(_meta_to_wire(image)))
        return image

    def _make_image(self, digest: str, size: int, module: wasmtime.Module,
                    memories: tuple[MemoryInfo, ...], globals_: tuple[GlobalInfo, ...],
                    imports: tuple[str, ...], functions: dict[str, FuncSig],
                    dirty_export: str | None) -> Image:
        try:
            pre = self.runtime.linker.instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            raise ImageRejected(f"imports do not match Cloudlet's host functions: "
                                f"{_first_line(exc)}") from None
        return Image(digest, size, self.runtime, module, pre, memories, globals_, imports,
                     functions, dirty_export, boot_fuel=self.boot_fuel,
                     boot_deadline_ms=self.boot_deadline_ms)

    def _boot_pristine(self, image: Image) -> tuple[PristineMemory, ...]:
        try:
            vm = VM.boot(image, VMLimits(memory_bytes=4 << 30))
        except VMError as exc:
            raise ImageRejected(f"image fails at boot: {exc.message}") from None
        try:
            return tuple(
                PristineMemory(len(vm.memory_view(i)) // chunks.WASM_PAGE_BYTES, h)
                for i, h in enumerate(vm.chunk_hashes())
            )
        finally:
            vm.close()

    def _load_compiled(self, digest: str) -> Image | None:
        cwasm, meta_path = self._cwasm_path(digest), self._meta_path(digest)
        if not _is_digest(digest) or not (cwasm.exists() and meta_path.exists()):
            return None
        try:
            meta = msgpack.unpackb(meta_path.read_bytes())
            if meta.get("format") != META_FORMAT or meta.get("digest") != digest:
                return None
            module = wasmtime.Module.deserialize_file(self.runtime.engine, str(cwasm))
        except (ValueError, KeyError, TypeError, wasmtime.WasmtimeError, msgpack.UnpackException):
            return None  # a damaged cache entry is recompiled, never trusted
        image = self._make_image(
            digest, meta["size_bytes"], module,
            tuple(MemoryInfo(*m) for m in meta["memories"]),
            tuple(GlobalInfo(*g) for g in meta["globals"]),
            tuple(meta["imports"]),
            {k: FuncSig(tuple(p), tuple(r)) for k, (p, r) in meta["functions"].items()},
            meta["dirty_export"],
        )
        image.pristine = tuple(PristineMemory(pages, np.frombuffer(h, dtype=np.uint64).copy())
                               for pages, h in meta["pristine"])
        return image


def _meta_to_wire(image: Image) -> dict[str, Any]:
    return {
        "format": META_FORMAT,
        "digest": image.digest,
        "size_bytes": image.size_bytes,
        "memories": [[m.export, m.min_pages, m.max_pages] for m in image.memories],
        "globals": [[g.export, g.index, g.valtype] for g in image.globals],
        "imports": list(image.imports),
        "functions": {k: [list(s.params), list(s.results)] for k, s in image.functions.items()},
        "pristine": [[p.pages, p.hashes.tobytes()] for p in image.pristine],
        "dirty_export": image.dirty_export,
    }


def _functions_of(module: wasmtime.Module) -> dict[str, FuncSig]:
    """Exported functions callable through the ABI (numeric parameters and results only)."""
    out: dict[str, FuncSig] = {}
    for exp in module.exports:
        ty = exp.type
        if not isinstance(ty, wasmtime.FuncType):
            continue
        params = tuple(str(p) for p in ty.params)
        results = tuple(str(r) for r in ty.results)
        if all(t in _NUMERIC for t in params + results):
            out[exp.name] = FuncSig(params, results)
    return out


def _is_digest(s: str) -> bool:
    return len(s) == 64 and all(c in "0123456789abcdef" for c in s)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
