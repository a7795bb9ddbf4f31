"""A blocking wrapper for scripts and notebooks: the SDK without `async`.

    with BlockingClient(token, endpoints=["http://127.0.0.1:8601"]) as client:
        with client.session("workloads/kvstore.wasm") as s:
            s.call("kv_put", 1, 65)
        print(client.offload("workloads/kvstore.wasm", "kv_count").value)

The async client runs on an event loop in one background thread that this
object owns; `close()` (or leaving the `with`) closes the client, stops the
loop and joins the thread, so nothing is left running. A notebook's own
running loop is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from cloudlet.errors import CloudletError
from mobile_client.client import CloudletClient, ImageRef, OffloadResult, Payload
from mobile_client.session import Session, SessionStats

T = TypeVar("T")


class BlockingSession:
    """A `Session` driven from blocking code."""

    def __init__(self, owner: BlockingClient, session: Session) -> None:
        self._owner = owner
        self.session = session

    @property
    def vm_id(self) -> str:
        return self.session.vm_id

    def call(self, fn: str, *args: int | float | bytes, deadline_ms: float | None = None) -> Any:
        return self._owner.run(lambda: self.session.call(fn, *args, deadline_ms=deadline_ms))

    def stats(self) -> SessionStats:
        return self.session.stats()


class BlockingClient:
    """`CloudletClient` with blocking methods. Takes the same arguments."""

    def __init__(self, token: str, **options: Any) -> None:
        self.client = CloudletClient(token, **options)  # bad options fail before the thread
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="cloudlet-sdk-loop", daemon=True)
        self._thread.start()
        try:
            self.run(self.client.__aenter__)
        except BaseException:
            self._stop_loop()
            raise

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, make: Callable[[], Awaitable[T]]) -> T:
        """Await `make()` on the client's loop and return its result here: the one way
        blocking code (this client's methods, a `BlockingSession`'s) reaches the loop."""
        if not self._thread.is_alive():
            raise CloudletError("the client is closed")

        async def awaited() -> T:
            return await make()
        return asyncio.run_coroutine_threadsafe(awaited(), self._loop).result()

    @contextlib.contextmanager
    def session(self, image: ImageRef, **options: Any) -> Iterator[BlockingSession]:
        manager = self.client.session(image, **options)
        session = self.run(manager.__aenter__)
        try:
            yield BlockingSession(self, session)
        finally:
            self.run(lambda: manager.__aexit__(None, None, None))

    def offload(self, image: ImageRef, fn: str, payload: Payload = (),
                **options: Any) -> OffloadResult:
        return self.run(lambda: self.client.offload(image, fn, payload, **options))

    def report_position(self, x_m: float, y_m: float, *, vx_m_s: float | None = None,
                        vy_m_s: float | None = None) -> bool:
        """`CloudletClient.report_position`. (A `position_source` given to the
        constructor is called on this client's own thread.)"""
        return self.run(lambda: self.client.report_position(x_m, y_m, vx_m_s=vx_m_s,
                                                             vy_m_s=vy_m_s))

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self.run(self.client.close)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
