"""A stream's calls without a socket: a message's bytes in, its answer's bytes out
(edge_agent/stream_calls.py), on a real VMHost with a real kvstore VM."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack

from edge_agent.auth import Principal
from edge_agent.config import NodeConfig
from edge_agent.metrics import Metrics
from edge_agent.stream_calls import Pending, StreamCalls
from edge_agent.vm_host import HostedVM, VMHost

ROOT = Path(__file__).resolve().parent.parent
KVSTORE = (ROOT / "workloads" / "kvstore.wasm").read_bytes()
CAP_BYTES = 4096
ALICE = Principal("alice", is_peer=False)


def with_stream(tmp_path: Path, body: Callable[[StreamCalls, VMHost, HostedVM, Metrics],
                                               Awaitable[None]],
                limits: dict[str, Any] | None = None) -> None:
    async def run() -> None:
        async with VMHost(NodeConfig(state_dir=str(tmp_path))) as host:
            image = await host.add_image(ALICE, KVSTORE, None)
            hosted = await host.create(ALICE, image.digest, limits)
            metrics = Metrics()
            await body(StreamCalls(host, metrics, hosted, CAP_BYTES), host, hosted, metrics)
    asyncio.run(run())


def answer(calls: StreamCalls, message: Any) -> dict[str, Any]:
    out = calls.answer_now(message if isinstance(message, bytes) else msgpack.packb(message))
    assert isinstance(out, bytes), out
    reply: dict[str, Any] = msgpack.unpackb(out)
    return reply


def test_calls_are_answered_with_their_ids(tmp_path: Path) -> None:
    async def body(calls: StreamCalls, host: VMHost, hosted: HostedVM, metrics: Metrics) -> None:
        assert answer(calls, {"id": 7, "fn": "add", "args": [1, 2]}) == {
            "id": 7, "result": 3, "seq": 1}
        assert answer(calls, {"id": "x", "fn": "kv_put", "args": [1, 10]})["id"] == "x"
        assert hosted.vm.seq == 2
        assert b'cloudlet_calls_total{outcome="ok",transport="ws"} 2.0' in metrics.render()
    with_stream(tmp_path, body)


def test_a_numbered_answer_is_kept_without_the_id(tmp_path: Path) -> None:
    async def body(calls: StreamCalls, host: VMHost, hosted: HostedVM, metrics: Metrics) -> None:
        first = answer(calls, {"id": 1, "fn": "kv_put", "args": [5, 50], "seq": 1})
        assert first["id"] == 1 and first["seq"] == 1 and first["result"] == 1
        kept = hosted.replies.get(1)
        assert kept is not None and "id" not in kept[1]  # the shared answer was copied
        # A resend under another id is answered from the log, with its own id.
        again = answer(calls, {"id": 2, "fn": "kv_put", "args": [5, 50], "seq": 1})
        assert again == {**first, "id": 2}
        assert hosted.vm.seq == 1  # applied once
    with_stream(tmp_path, body)


def test_refusals_are_typed_answers(tmp_path: Path) -> None:
    async def body(calls: StreamCalls, host: VMHost, hosted: HostedVM, metrics: Metrics) -> None:
        assert answer(calls, b"\xc1")["error"]["code"] == "malformed_request"
        assert answer(calls, b"\xc1")["id"] is None
        reply = answer(calls, {"id": 3, "fn": "add", "args": ["1", 2]})
        assert reply["id"] == 3 and reply["error"]["code"] == "malformed_request"
        reply = answer(calls, {"id": 4, "fn": "nope", "args": []})
        assert reply["id"] == 4 and reply["error"]["code"] == "bad_call"
        big = {"id": 5, "fn": "add", "args": [1, 2], "seq": 1, "pad": b"x" * CAP_BYTES}
        reply = answer(calls, big)
        assert reply["id"] == 5 and reply["error"]["code"] == "request_too_large"
        assert hosted.vm.seq == 1  # the oversized call used up its number
        text = msgpack.unpackb(calls.refuse_text())
        assert text["id"] is None and text["error"]["code"] == "malformed_request"
        rendered = metrics.render()
        assert b'cloudlet_errors_total{code="malformed_request"} 3.0' in rendered
        assert b'cloudlet_errors_total{code="request_too_large"} 1.0' in rendered
    with_stream(tmp_path, body)


def test_a_call_that_must_wait_is_answered_later(tmp_path: Path) -> None:
    async def body(calls: StreamCalls, host: VMHost, hosted: HostedVM, metrics: Metrics) -> None:
        assert not hosted.inline  # a long deadline: its calls run on the call threads
        pending = calls.answer_now(msgpack.packb({"id": 9, "fn": "add", "args": [4, 5]}))
        assert isinstance(pending, Pending)
        assert hosted.vm.seq == 0  # nothing ran yet
        reply = msgpack.unpackb(await calls.answer_later(pending))
        assert reply == {"id": 9, "result": 9, "seq": 1}
    with_stream(tmp_path, body, limits={"deadline_ms": 500})


def test_a_call_waits_while_its_vm_is_held(tmp_path: Path) -> None:
    async def body(calls: StreamCalls, host: VMHost, hosted: HostedVM, metrics: Metrics) -> None:
        async with hosted.lock:  # a checkpoint or a move holds the VM across an await
            pending = calls.answer_now(msgpack.packb({"id": 1, "fn": "add", "args": [1, 1]}))
            assert isinstance(pending, Pending)
            later = asyncio.ensure_future(calls.answer_later(pending))
            await asyncio.sleep(0.01)
            assert not later.done() and hosted.vm.seq == 0
        assert msgpack.unpackb(await later) == {"id": 1, "result": 2, "seq": 1}
    with_stream(tmp_path, body)
