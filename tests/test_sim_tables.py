"""The simulator's tables: columns stay in step through growth, filtering and
appends, and migrations in flight share links as the model says."""

from __future__ import annotations

import numpy as np
import pytest

from cloudlet.placement import PrecopyModel
from cloudlet.sim.hosting import CloudletLoad, Hosting
from cloudlet.sim.migrations import PRECOPY, RESUME, SETUP, Migrations
from cloudlet.sim.users import Users

MiB = float(1 << 20)


def test_grow_adds_rows_at_each_columns_fill_and_keeps_the_old_ones() -> None:
    h = Hosting.empty(2)
    h.host[:] = [3, 4]
    h.grow(4)
    assert h.host.tolist() == [3, 4, -1, -1]
    assert h.previous_host.tolist() == [-1] * 4
    assert h.last_move_s.tolist() == [-np.inf] * 4
    assert h.migrating.tolist() == [False] * 4
    h.grow(3)  # never shrinks
    assert len(h) == 4
    u = Users.empty(1)
    u.grow(3)
    assert u.xy_m.shape == (3, 2) and u.workload.dtype == np.int64 and u.active.dtype == bool


def test_keep_filters_every_column_together() -> None:
    h = Hosting.empty(4)
    h.host[:] = [0, 1, 2, 3]
    h.last_move_s[:] = [10.0, 11.0, 12.0, 13.0]
    h.migrating[:] = [False, True, False, True]
    h.keep(np.array([True, False, True, False]))
    assert h.host.tolist() == [0, 2]
    assert h.last_move_s.tolist() == [10.0, 12.0]
    assert h.migrating.tolist() == [False, False]


def test_cloudlet_load_counts_a_migration_where_it_serves() -> None:
    load = CloudletLoad.empty(2)
    load.place(0, 100.0)
    load.reserve(np.array([1]), np.array([100.0]))
    assert (load.vms.tolist(), load.serving.tolist()) == ([1, 1], [1, 0])
    load.arrive(np.array([0]), np.array([1]), np.array([100.0]))
    assert (load.vms.tolist(), load.serving.tolist()) == ([0, 1], [0, 1])
    assert load.memory_bytes.tolist() == [0.0, 100.0]


def _start(m: Migrations, paths: list[list[int]], cost: PrecopyModel,
           overlay_mib: float = 64.0) -> None:
    k = len(paths)
    m.start(np.arange(len(m), len(m) + k), np.zeros(k, dtype=np.int64),
            np.ones(k, dtype=np.int64), np.full(k, overlay_mib * MiB), np.zeros(k),
            [np.array(p, dtype=np.int64) for p in paths], cost)


def test_start_widens_the_link_table_to_the_longest_path() -> None:
    cost = PrecopyModel(wire_ratio=0.5)
    m = Migrations.empty()
    _start(m, [[0], [2, 4, 6]], cost)
    _start(m, [[1, 3]], cost)
    assert m.links.tolist() == [[0, -1, -1], [2, 4, 6], [1, 3, -1]]
    assert m.slot.tolist() == [0, 1, 2]
    assert m.phase.tolist() == [SETUP] * 3
    assert m.remaining_bytes.tolist() == [32 * MiB] * 3  # the overlay on the wire
    m.keep(np.array([False, True, True]))
    assert m.slot.tolist() == [1, 2] and m.links.tolist() == [[2, 4, 6], [1, 3, -1]]


@pytest.mark.parametrize(("paths", "share"), [
    ([[0]], 1.0),  # alone on the link
    ([[0], [0]], 0.5),  # two on one direction share it
    ([[0], [1]], 1.0),  # opposite directions do not compete (full duplex)
    ([[0, 2], [2]], 0.5),  # the narrowest share along the path wins
])
def test_migrations_share_each_directed_link(paths: list[list[int]], share: float) -> None:
    cost = PrecopyModel()
    m = Migrations.empty()
    _start(m, paths, cost, overlay_mib=512.0)  # far more than one tick sends
    link_rate = np.full(4, 100e6 / 8)
    mem = np.full(len(paths), 1024 * MiB)
    progress = m.progress(link_rate, 2, 1.0, cost, mem, np.zeros(len(paths)))
    assert progress.rate_bytes_s.tolist() == [share * 100e6 / 8] * len(paths)
    assert progress.sent_bytes.tolist() == pytest.approx([share * 100e6 / 8] * len(paths))
    assert m.phase.tolist() == [PRECOPY] * len(paths) and not progress.done.any()


def test_a_small_migration_finishes_within_one_tick_and_reports_its_pause() -> None:
    cost = PrecopyModel(resume_s=0.01)
    m = Migrations.empty()
    _start(m, [[0]], cost, overlay_mib=1.0)
    mem = np.array([8 * MiB])
    progress = m.progress(np.full(2, 1e9), 2, 1.0, cost, mem, np.zeros(1))
    assert progress.done.tolist() == [True] and m.phase.tolist() == [RESUME]
    assert progress.sent_bytes[0] >= 1.0 * MiB
    pauses = m.pauses(progress, cost.resume_s)
    assert pauses is not None and pauses.slot.tolist() == [0]
    assert pauses.paused_s[0] == pytest.approx(m.stop_s[0] + cost.resume_s)
