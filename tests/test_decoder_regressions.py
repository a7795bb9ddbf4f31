"""Bugs the fuzzers found in decoders of outside bytes, one test each, named for the
behaviour that was wrong. The inputs they found are in fuzz/regressions/ (replayed
by tests/test_fuzz_corpus.py); these tests say, by hand, what each fix promises."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import replace

import msgpack
import pytest

from cloudlet.errors import (
    ImageRejected,
    MalformedRequest,
    MigrationProtocolError,
    MigrationVersionUnsupported,
    SnapshotCorrupt,
    SnapshotVersionUnsupported,
    Unauthorized,
    VMTrapped,
    error_from_wire,
)
from cloudlet.migration.messages import decode
from cloudlet.vm import VM, Image, Snapshot
from cloudlet.vm import wasm_binary as wb
from cloudlet.vm.instrument import instrument
from edge_agent.replies import ReplyLog
from edge_agent.requests import Call, parse_call, unpack_map


def nested(value: object, depth: int) -> object:
    for _ in range(depth):
        value = [value]
    return value


def test_a_reply_log_with_a_number_twice_keeps_one_answer_and_counts_it_once() -> None:
    log = ReplyLog.from_wire([[4, ["a", []], {"result": 1, "seq": 4}],
                              [4, ["b", []], {"result": 2, "seq": 4}]])
    assert log.to_wire() == [[4, ["b", []], {"result": 2, "seq": 4}]]
    log.acknowledge(4)
    assert len(log) == 0 and log.size_bytes == 0  # was: bytes of the dropped answer left over


def test_a_reply_log_out_of_order_is_trimmed_by_acknowledgments() -> None:
    log = ReplyLog.from_wire([[5, ["a", []], {"seq": 5}], [1, ["a", []], {"seq": 1}]])
    log.acknowledge(3)
    assert [seq for seq, _, _ in log.to_wire()] == [5]  # was: 1 kept, acknowledge stopped at 5


def test_a_reply_log_entry_without_a_call_identity_is_dropped() -> None:
    wire = [[1, [], {"seq": 1}], [2, [7, []], {"seq": 2}], [3, ["kv_get", [1]], {"seq": 3}]]
    assert [seq for seq, _, _ in ReplyLog.from_wire(wire).to_wire()] == [3]  # was: IndexError


def test_a_numbered_call_whose_fn_is_nested_deep_is_refused_not_crashed() -> None:
    body = unpack_map(msgpack.packb({"seq": 1, "fn": nested([], 1000)}))
    call = parse_call(body)  # was: RecursionError from str(fn), a 500 or a dead stream
    assert call.seq == 1 and isinstance(call.refused, MalformedRequest)
    assert call.fn.startswith("[[[") and len(call.fn) <= 200


def test_a_reply_log_entry_nested_deeper_than_the_daemons_is_dropped() -> None:
    deep = [1, ["kv_get", [1]], {"error": {"code": "vm_trapped", "message": "m",
                                           "details": {"x": nested(0, 1000)}}, "seq": 1}]
    kept = [2, ["kv_get", [2]], {"error": {"code": "vm_moved", "message": "m",
                                           "details": {"node": "a"}}, "seq": 2}]
    log = ReplyLog.from_wire([deep, kept])  # was: RecursionError sizing the first answer
    assert log.to_wire() == [kept]


def test_an_error_answer_nested_deep_is_reported_not_raised() -> None:
    assert "malformed error answer" in error_from_wire(nested(0, 1000)).message
    exc = error_from_wire({"code": "vm_trapped", "message": nested("m", 1000)})
    assert isinstance(exc, VMTrapped) and exc.message.startswith("[[[")


def test_a_client_sent_too_large_key_steers_nothing() -> None:
    # Was: the stream marked a message over the cap with this key in the client's own
    # map, so a client could refuse its call with a message of its choosing (nested
    # deep, a RecursionError sizing it in the reply log). The mark is now the
    # stand-in's type (edge_agent.requests.OversizedMessage); the key is just ignored.
    call = parse_call({"seq": 3, "fn": "f", "too_large": nested("x", 1000)})
    assert call == Call("f", seq=3) and call.refused is None
    log = ReplyLog()  # where its answer is kept
    log.add(3, call.identity(), {"result": 0, "seq": 3})
    assert len(log) == 1


def test_a_snapshot_global_nested_deep_is_corrupt_not_a_crash(workload: dict[str, Image]) -> None:
    vm = VM.create(workload["kvstore"])
    snap = vm.snapshot()
    vm.close()
    deep = replace(snap, globals={name: nested(0, 1000) for name in snap.globals})
    with pytest.raises(SnapshotCorrupt, match=r"got \[\[\["):  # was: RecursionError
        VM.restore(workload["kvstore"], Snapshot.from_bytes(deep.to_bytes()))


def test_a_snapshot_format_version_nested_deep_is_unsupported_not_a_crash() -> None:
    header = msgpack.packb({"format": nested(1, 1000)})
    with pytest.raises(SnapshotVersionUnsupported):  # was: RecursionError
        Snapshot.from_bytes(b"CLDSNAP\n" + struct.pack("<I", len(header)) + header)


def test_a_migration_schema_version_nested_deep_is_unsupported_not_a_crash() -> None:
    with pytest.raises(MigrationVersionUnsupported):  # was: RecursionError
        decode(msgpack.packb({"v": nested(1, 1000), "t": "ready", "migration_id": "m"}))


def test_a_snapshot_body_with_extra_data_after_a_deep_value_is_corrupt() -> None:
    body = msgpack.packb({"kind": nested(0, 1000)}) + b"\x00"
    header = msgpack.packb({"format": 1, "compression": "none", "body_bytes": len(body),
                            "raw_bytes": len(body),
                            "sha256": hashlib.sha256(body).hexdigest()})
    data = b"CLDSNAP\n" + struct.pack("<I", len(header)) + header + body
    with pytest.raises(SnapshotCorrupt, match="ExtraData"):  # was: RecursionError from repr
        Snapshot.from_bytes(data)


def test_a_migration_message_type_nested_deep_is_unknown_not_a_crash() -> None:
    with pytest.raises(MigrationProtocolError, match="unknown message type"):
        decode(msgpack.packb({"v": 1, "t": nested("ready", 1000), "migration_id": "m"}))


def test_a_vm_restored_with_fuel_used_at_the_top_can_still_be_snapshotted(
        workload: dict[str, Image]) -> None:
    vm = VM.create(workload["kvstore"])
    top = replace(vm.snapshot(), fuel_used=(1 << 64) - 1)
    vm.close()
    restored = VM.restore(workload["kvstore"], Snapshot.from_bytes(top.to_bytes()))
    try:
        restored.call("kv_count")  # the counter passes 2^64 - 1
        again = Snapshot.from_bytes(restored.snapshot().to_bytes())  # was: OverflowError
        assert again.fuel_used == (1 << 64) - 1
    finally:
        restored.close()


def module(*sections: tuple[int, bytes]) -> bytes:
    return wb.join_sections([wb.Section(sec_id, payload, 0) for sec_id, payload in sections])


@pytest.mark.parametrize(("wasm", "why", "modes"), [
    (module((42, b"")), "unknown section id 42", (True, False)),  # was: ValueError
    (module((wb.SEC_CODE, b"\x01\x05\x00")), "runs past the end", (True, False)),  # IndexError
    # one type, one function, one memory, and two bodies: was IndexError when tracked
    # (untracked, the rewriter never pairs bodies with types; wasmtime refuses it)
    (module((wb.SEC_TYPE, b"\x01\x60\x00\x00"), (wb.SEC_FUNCTION, b"\x01\x00"),
            (wb.SEC_MEMORY, b"\x01\x00\x01"), (wb.SEC_CODE, b"\x02\x02\x00\x0b\x02\x00\x0b")),
     "count different functions", (True,)),
], ids=["unknown-section", "body-past-section", "more-bodies-than-functions"])
def test_the_rewriter_rejects_malformed_modules_with_a_typed_error(
        wasm: bytes, why: str, modes: tuple[bool, ...]) -> None:
    for track_writes in modes:
        with pytest.raises(ImageRejected, match=why):
            instrument(wasm, track_writes=track_writes)


def test_a_snapshot_with_integer_map_keys_in_its_annex_reads_back(
        workload: dict[str, Image]) -> None:
    # A live migration's final round carries the source's annex, decoded with integer
    # keys allowed; the destination writes it to disk and reads it at a restart.
    vm = VM.create(workload["kvstore"])
    snap = replace(vm.snapshot(), annex={"replies": {1: b"ok"}})
    vm.close()
    assert Snapshot.from_bytes(snap.to_bytes()).annex == {"replies": {1: b"ok"}}  # was: corrupt


def test_a_signed_peer_token_whose_audience_is_nested_deep_is_refused() -> None:
    from fuzz.bearer_token import AUTHORITY, NOW, signed_by_peer

    claims = {"iss": "harbor", "aud": nested("downtown", 1000), "iat": int(NOW),
              "exp": int(NOW) + 60}
    with pytest.raises(Unauthorized, match="downtown"):  # was: RecursionError, a 500
        AUTHORITY.check("Bearer " + signed_by_peer(msgpack.packb(claims)))


def test_a_signed_message_whose_schema_version_is_nested_deep_is_untrusted_not_a_crash(
) -> None:
    """A member of the cluster (a buggy or compromised one) signs a body whose `v` is
    nested past the recursion limit: the gate refuses it as a wrong schema, it does
    not raise RecursionError out of the control plane's reader."""
    from cloudlet.errors import TrustError
    from cloudlet.protocol import presence_topic
    from cloudlet.trust.gate import ControlGate
    from fuzz.control_plane import CLOUDLET, VERIFIER, fixed_clock, sealed_body

    topic = presence_topic("downtown")
    body = msgpack.packb({"ts": fixed_clock(), "nonce": bytes(12), "v": nested(1, 1000)})
    with pytest.raises(TrustError) as refused:
        ControlGate(VERIFIER, clock=fixed_clock).admit(topic, sealed_body(CLOUDLET, topic, body))
    assert refused.value.details["reason"] == "schema"
