"""The images of one cloudlet and who holds them.

The store (`cloudlet.vm.ImageStore`) keeps modules by digest, compiled; this
module adds what a shared daemon needs on top: each client sees and deletes only
the images it uploaded (a peer, all of them), each upload counts against its
uploader's image quota (edge_agent/quotas.py) and the record of who holds what
is written to disk after every change, and an image is never deleted while a VM
uses it or is being created from it.

Compiling an upload (milliseconds to seconds) runs on the boot threads in the
uploader's turn, and the holders' record is written on a checkpoint thread: the
event loop only decides.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

from cloudlet.errors import ImageInUse, ImageNotFound, ImageRejected, ImageTooLarge
from cloudlet.fsutil import storage_full
from cloudlet.vm import Image, ImageStore, image_digest
from edge_agent.auth import Principal
from edge_agent.quotas import Quotas
from edge_agent.workers import Workers


class Images:
    """Uploads, listings and deletions by client, over `store`. `users(digest)` names
    the hosted VMs of an image (the host knows them); `workers()` the daemon's
    thread pools (raises `ShuttingDown` once they are gone)."""

    def __init__(self, store: ImageStore, quotas: Quotas, workers: Callable[[], Workers],
                 users: Callable[[str], list[str]]) -> None:
        self.store = store
        self.quotas = quotas
        self._workers = workers
        self._users = users
        self._creating: dict[str, int] = {}  # image digest -> creates in flight
        self._holders_lock = asyncio.Lock()

    async def add(self, who: Principal, wasm: bytes, expected_digest: str | None) -> Image:
        """Register an upload; it counts against its uploader's image quota (a peer's
        counts against nobody: it comes with a VM)."""
        if len(wasm) > self.store.max_image_bytes:
            raise ImageTooLarge(f"image is {len(wasm)} bytes; this cloudlet takes at most "
                                f"{self.store.max_image_bytes}")
        boots = self._workers().boots
        digest = await boots.run(who.name, lambda: image_digest(wasm))
        if expected_digest is not None and digest != expected_digest.lower():
            raise ImageRejected(f"the upload's SHA-256 is {digest}, not the "
                                f"{expected_digest} it was announced as")
        counted = not who.is_peer and self.quotas.hold_image(who.name, digest)
        try:
            # Compiling (and the boot that records the pristine state) takes
            # milliseconds to seconds: off the event loop, in the client's turn.
            image = await boots.run(who.name, lambda: self.store.add(wasm))
            if counted:
                await self._save_holders()
        except OSError as exc:  # the disk refused (StorageFull): said without our paths
            if counted:
                self.quotas.release_image(who.name, digest)
            raise storage_full(exc, "cannot store the image") from exc
        except BaseException:
            if counted:
                self.quotas.release_image(who.name, digest)
            raise
        return image

    def of(self, who: Principal) -> list[str]:
        """The images `who` may see: a client, those it uploaded; a peer, all."""
        if who.is_peer:
            return self.store.list()
        return self.quotas.held_by(who.name)

    async def delete(self, who: Principal, digest: str) -> None:
        """A client deletes only an image it uploaded; while other clients hold it too,
        only its own hold goes (the image stays theirs). A peer deletes any unused one."""
        if not who.is_peer:
            holders = self.quotas.holders(digest)
            if who.name not in holders:
                raise ImageNotFound(f"no image {digest[:16]!r} of this client here")
            if holders - {who.name}:
                self.quotas.release_image(who.name, digest)
                await self._save_holders()
                return
        users = self._users(digest)
        if self._creating.get(digest):
            users.append("(a VM being created)")
        if users:
            raise ImageInUse(f"image {digest[:12]} is used by {len(users)} VMs, e.g. {users[0]}")
        self.store.delete(digest)
        self.quotas.forget_image(digest)
        await self._save_holders()

    @contextlib.contextmanager
    def creating(self, digest: str) -> Iterator[None]:
        """A VM of `digest` is being created: the image is in use meanwhile."""
        self._creating[digest] = self._creating.get(digest, 0) + 1
        try:
            yield
        finally:
            self._creating[digest] -= 1

    def get(self, digest: str) -> Image:
        """An image of the store (call off the loop: it may compile). The error names
        no path of this machine: it goes to clients."""
        try:
            return self.store.get(digest)
        except ImageNotFound:
            raise ImageNotFound(f"no image {digest[:80]!r} on this cloudlet") from None

    async def _save_holders(self) -> None:
        async with self._holders_lock:  # one write at a time: the newest lands last
            record = self.quotas.record()
            try:
                await self._workers().checkpoints.run(Workers.NODE,
                                                      lambda: Quotas.write_record(record))
            except OSError as exc:  # said without our paths: it goes to the client
                raise storage_full(exc, "cannot record who uploaded which image") from exc
