"""The microVM runtime: images, VMs with limits, snapshots, overlays and deltas.

A WebAssembly instance run by wasmtime is our VM: it boots in microseconds, is
sandboxed by construction, and its whole state can be read, diffed and moved.
"""

from cloudlet.vm import chunks
from cloudlet.vm.chunks import CHUNK_BYTES
from cloudlet.vm.compiled import Image
from cloudlet.vm.image import ImageStore, image_digest
from cloudlet.vm.machine import VM, FuncSig, VMLimits
from cloudlet.vm.snapshot import MemoryState, Snapshot

__all__ = ["CHUNK_BYTES", "VM", "FuncSig", "Image", "ImageStore", "MemoryState", "Snapshot",
           "VMLimits", "chunks", "image_digest"]
