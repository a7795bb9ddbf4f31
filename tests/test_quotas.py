"""The quota policy on its own: what a client may take, and what its reply logs may keep."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudlet.errors import QuotaExceeded
from edge_agent.config import NodeConfig
from edge_agent.exactly_once import ExactlyOnce, Replay
from edge_agent.quotas import REPLY_FLOOR_BYTES, REPLY_LOG_MAX_BYTES, Quotas, Usage
from edge_agent.replies import ReplyLog

MiB = 1 << 20


def quotas(tmp_path: Path, **settings: int) -> Quotas:
    return Quotas(NodeConfig(state_dir=str(tmp_path), **settings))  # type: ignore[arg-type]


@pytest.mark.parametrize(("held", "cap", "replies", "quota"), [
    (Usage(2, 32 * MiB), 16 * MiB, 0, "vms"),
    (Usage(1, 16 * MiB, 10 * MiB), 16 * MiB, 0, "memory_bytes"),  # the answers kept count
    (Usage(1, 16 * MiB), 16 * MiB, 10 * MiB, "memory_bytes"),  # so do the arriving VM's
    (Usage(1, 16 * MiB), 24 * MiB, 0, None),
    (Usage(0), 40 * MiB, 0, None),
])
def test_check_vm(tmp_path: Path, held: Usage, cap: int, replies: int,
                  quota: str | None) -> None:
    q = quotas(tmp_path, client_max_vms=2, client_max_memory_mib=40)
    if quota is None:
        q.check_vm("alice", held, cap, replies)
        return
    with pytest.raises(QuotaExceeded) as err:
        q.check_vm("alice", held, cap, replies)
    details = err.value.details
    assert details["quota"] == quota
    assert details["use"] == (held.vms if quota == "vms" else held.memory_bytes)
    assert details["limit"] == (2 if quota == "vms" else 40 * MiB)


@pytest.mark.parametrize(("held", "cap"), [
    (Usage(0), REPLY_LOG_MAX_BYTES),
    (Usage(1, 16 * MiB), REPLY_LOG_MAX_BYTES),  # 24 MiB of room: the log's own cap
    (Usage(2, 32 * MiB), 4 * MiB),  # 8 MiB of room, shared by two logs
    (Usage(2, 40 * MiB), REPLY_FLOOR_BYTES),  # no room: the floor
])
def test_reply_logs_share_what_the_caps_leave(tmp_path: Path, held: Usage, cap: int) -> None:
    assert quotas(tmp_path, client_max_memory_mib=40).reply_cap_bytes(held) == cap


def test_a_lowered_cap_drops_the_oldest_answers_at_once() -> None:
    log = ReplyLog()
    for seq in range(1, 11):
        log.add(seq, ["f", []], {"data": b"x" * (100 << 10), "seq": seq})
    log.set_cap(300 << 10)
    assert log.size_bytes <= 300 << 10 and len(log) == 2
    kept = ExactlyOnce(log).resent(10, 10, ["f", []])
    assert isinstance(kept, Replay) and kept.answer()["seq"] == 10


def test_images_count_per_uploader_and_survive_a_restart(tmp_path: Path) -> None:
    q = quotas(tmp_path, client_max_images=2)
    assert q.hold_image("alice", "a" * 64) and q.hold_image("alice", "b" * 64)
    assert not q.hold_image("alice", "a" * 64)  # held already: free
    with pytest.raises(QuotaExceeded) as err:
        q.hold_image("alice", "c" * 64)
    assert err.value.details == {"quota": "images", "limit": 2, "use": 2}
    assert q.hold_image("bob", "a" * 64)  # shared content counts for each uploader
    Quotas.write_record(q.record())
    again = quotas(tmp_path, client_max_images=2)
    again.load(["a" * 64])  # b is gone from the store: it counts no more
    assert again.images_of("alice") == 1 and again.images_of("bob") == 1
    again.forget_image("a" * 64)
    assert again.images_of("alice") == 0
