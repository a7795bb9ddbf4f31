"""Runs a sweep's runs on Dask distributed: a local cluster, or one already running.

Dask because a sweep is many independent CPU-bound runs of seconds each: its
`LocalCluster` gives one worker process per core on this machine with nothing to
set up, and the very same code sends the runs to a cluster of many machines
(`--scheduler tcp://HOST:PORT`), each worker with cloudlet installed and the
scenario's files at the same paths. A run is a plain function of a pickled
`Scenario` (`cloudlet.sim.sweep.run_unit`), so a worker computes exactly what
this process would: same seed, same bits.

It lives outside `cloudlet.sim`, which does no network I/O (an import-linter
contract): the simulator stays runnable anywhere numpy is.
"""

# distributed ships type hints, but its Client, LocalCluster and as_completed are not
# annotated: calls into them are untyped by nature, not by our choice.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from distributed import Client, LocalCluster, as_completed

from cloudlet.sim.sweep import Metrics, Run, run_unit

# A cluster the user named may be busy or far: how long to wait for its scheduler.
CONNECT_TIMEOUT_S = 30

# The scheduler's HTTP server (health, metrics) on a free port, its dashboard off.
NO_FIXED_HTTP_PORT = {"dashboard": False, "dashboard_address": ":0"}


def default_workers() -> int:
    """One worker per core this process may use (each worker runs one run at a time,
    its placer on one thread)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class DaskEngine:
    """Submits each run as one task and yields results as they complete."""

    name = "dask"

    def __init__(self, client: Client) -> None:
        self.client = client

    @property
    def workers(self) -> int:
        return len(self.client.nthreads())

    def results(self, runs: Sequence[Run]) -> Iterator[tuple[Run, Metrics]]:
        # The cache key names the task: the same run submitted twice (two sweeps
        # sharing a cluster) is computed once.
        futures = {self.client.submit(run_unit, run.scenario, key=f"cloudlet-run-{run.key}"):
                   run for run in runs}
        try:
            for future in as_completed(futures):
                metrics: Metrics = future.result()
                yield futures[future], metrics
        finally:
            # Stopped early (an error, Ctrl-C): the cluster drops what is left.
            self.client.cancel(list(futures))


@contextmanager
def dask_engine(workers: int | None = None, scheduler: str | None = None
                ) -> Iterator[DaskEngine]:
    """An engine on the cluster at `scheduler`, or on a LocalCluster of `workers`
    processes (default: one per core) closed when the block ends."""
    if scheduler is not None:
        with Client(scheduler, timeout=CONNECT_TIMEOUT_S) as client:
            yield DaskEngine(client)
        return
    n = default_workers() if workers is None else workers
    # No dashboard (nobody looks at it in a batch run), and the scheduler's own HTTP
    # server on a free port (without one it takes 8787, which another cluster on
    # the machine may hold); one thread per worker: a run holds the GIL for its
    # whole length. One worker per core, each run on one thread: the placer's
    # per-row threads (placement/slices.py) would only contend with the other workers.
    with (LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                       dashboard_address=None, silence_logs=logging.ERROR,
                       scheduler_kwargs=NO_FIXED_HTTP_PORT,
                       env={"CLOUDLET_PLACER_THREADS": "1"}) as cluster,
          Client(cluster) as client):
        yield DaskEngine(client)
