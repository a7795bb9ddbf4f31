"""Benchmark of the daemon's call path: WebSocket stream and HTTP, 1 and 64 clients.

Prints a table and writes benchmarks/results/daemon.json. A real daemon (`cloudlet
agent`, its own process, uvloop, `vm_deadline_ms = 50` so calls run inline on the
event loop) hosts one kvstore VM per client; the small call is `add(1, 2)`:
`{"id", "fn": "add", "args": [1, 2]}` over `GET /v1/vms/{vm}/stream` (binary
msgpack, one reply per message) and `{"fn": "add", "args": [1, 2]}` POSTed to
`/v1/vms/{vm}/call` (keep-alive). The baseline, measured in the same run, is a bare
aiohttp WebSocket echo server in its own process under uvloop, sent the same
msgpack bytes by the same clients (and, for context, a bare aiohttp HTTP echo).
Every client makes one call at a time; latency is the round trip seen by the
client; 64-client throughput is calls completed in a fixed window / its length,
the median over rounds, where each server's window runs right beside its echo's
(first in turn), so the host's drift hits both alike. Targets (this 2-core machine):

    WebSocket call p50 within 1.2x of the bare echo's; with 64 clients at least
    0.75x the bare echo's throughput and more than 8,000 calls/s per daemon.

The ratios to the echo of the same run are in the JSON (`ws_call_p50_vs_echo`,
`ws_calls_per_s_64_vs_echo`): on a machine shared with other work they are what
compares from run to run, not the absolute figures.

The load generator (this process, uvloop + aiohttp client) runs on the same
2-core machine as the server it drives, so absolute figures understate what the
daemon would do with its clients elsewhere; that is why the daemon and the echo
server are driven by the same generator and compared with each other. By default
the generator is pinned to the first CPU and both servers to the other(s): each
side gets a core of its own, and 1-client round trips always cross CPUs (left to
the scheduler, a ping-pong pair sometimes shares one CPU, which halves the
echo's round trip and makes the p50 ratio flip from run to run; `--no-pin`).
Server-side CPU per call (from /proc, all the server's threads) is reported too,
as it depends less on the generator.

It also measures isolation (benchmarks/neighbour.py), on a second daemon started
afterwards: a neighbour's call latency while another client checkpoints a 1 GiB
VM, or boots VMs whose `_initialize` burns most of the boot fuel, against its
latency with nothing else running in the same run. Target: the neighbour's p99
during either <= 5 ms.

Usage: python benchmarks/daemon.py [--quick] [--profile] [--no-pin] [--out FILE]
                                   [--neighbours-only]
       python benchmarks/daemon.py --echo-server PORT   (the baseline server alone)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import platform
import pstats
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import uvloop
from aiohttp import WSMsgType, web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import neighbour  # noqa: E402
from cloudlet.fsutil import atomic_write  # noqa: E402
from cloudlet.trust.cluster import cluster_tokens, ensure_authority  # noqa: E402

KVSTORE = ROOT / "workloads" / "kvstore.wasm"
MEMHOG = ROOT / "workloads" / "memhog.wasm"
RESULTS = ROOT / "benchmarks" / "results" / "daemon.json"
CLIENTS = 64
READY_TIMEOUT_S = 60.0  # a daemon under cProfile starts slowly
STOP_TIMEOUT_S = 30.0  # the daemon checkpoints every VM on SIGTERM
PHASE_SLACK_S = 30.0  # a phase that overruns its length by this much is a hung server
ECHO_LIFETIME_S = 1800.0  # the echo server exits by itself after this, whatever happens
MAX_MSG_BYTES = 1024 << 10  # the daemon's default max_request_kib, for the echo server too
CLK_TCK = os.sysconf("SC_CLK_TCK")
MSGPACK = "application/msgpack"
DAEMON_SETTINGS: dict[str, Any] = {"vm_deadline_ms": 50}  # inline calls; the rest default
TARGETS = {"ws_p50_vs_echo_max": 1.2, "ws_calls_per_s_64_vs_echo_min": 0.75,
           "ws_calls_per_s_64_min": 8000}


@dataclass(frozen=True)
class Plan:
    rounds: int  # each target is run once per round, in rotating order
    seq_calls: int  # 1 client: sequential calls per round
    seq_warmup: int
    warmup_s: float  # 64 clients: per round, before the measured window
    window_s: float


QUICK = Plan(rounds=1, seq_calls=1000, seq_warmup=100, warmup_s=0.3, window_s=1.0)
FULL = Plan(rounds=8, seq_calls=1000, seq_warmup=200, warmup_s=0.5, window_s=1.0)


class BenchError(RuntimeError):
    pass


# --- processes -------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def cpu_split(pin: bool) -> tuple[set[int], set[int]] | None:
    """(load generator CPUs, server CPUs): the first CPU for the generator, the rest for
    the servers; None when not pinning or there is only one CPU."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not pin or len(cpus) < 2:
        return None
    return {cpus[0]}, set(cpus[1:])


def _child_setup(server_cpus: set[int] | None) -> Callable[[], None]:
    def setup() -> None:
        """In the child before exec: its CPUs; SIGTERM when the benchmark dies, even by
        SIGKILL."""
        if server_cpus is not None:
            os.sched_setaffinity(0, server_cpus)
        if sys.platform == "linux":
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return setup


def spawn(name: str, argv: list[str], log_path: Path, children: list[Server],
          cpus: set[int] | None) -> Server:
    """Start `argv` on `cpus` and wait for its `ready NAME URL` line on stdout."""
    with log_path.open("ab") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log,
                                stdin=subprocess.DEVNULL, cwd=ROOT,
                                preexec_fn=_child_setup(cpus))
    server = Server(name, proc, "", log_path)
    children.append(server)  # stopped by the caller's finally, ready or not
    assert proc.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT_S
    for _ in range(1000):  # lines before the ready line: none expected
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stdout], [], [], max(remaining, 0))
        if not ready:
            raise BenchError(f"{name} not ready in {READY_TIMEOUT_S} s:\n{server.log_tail()}")
        line = proc.stdout.readline().decode(errors="replace")
        if not line:
            raise BenchError(f"{name} exited ({proc.wait(5)}):\n{server.log_tail()}")
        if line.startswith("ready "):
            server.url = line.split()[2]
            return server
    raise BenchError(f"{name} printed no ready line")


def stop(server: Server) -> None:
    proc = server.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def start_daemon(tmp: Path, profile_path: Path | None, children: list[Server],
                 cpus: set[int] | None, name: str = "daemon",
                 settings: dict[str, Any] | None = None) -> Server:
    state = tmp / name
    state.mkdir()
    secret = tmp / "cluster.key"
    if not secret.exists():  # the second daemon (isolation) joins the same cluster
        secret.write_text(os.urandom(32).hex())
    ensure_authority(tmp)  # ca.key beside the secret: the daemon issues its certificate
    table: dict[str, Any] = {"name": "bench", "port": 0, "state_dir": str(state),
                             "secret_file": str(secret),
                             **(DAEMON_SETTINGS if settings is None else settings)}
    lines = ["[node]"] + [f"{k} = {v!r}" if isinstance(v, int | float) else f'{k} = "{v}"'
                          for k, v in table.items()]
    config = state / "node.toml"
    config.write_text("\n".join(lines) + "\n")
    argv = [sys.executable]
    if profile_path is not None:
        argv += ["-m", "cProfile", "-o", str(profile_path)]
    argv += ["-m", "cloudlet.cli", "agent", "--config", str(config)]
    return spawn(name, argv, tmp / f"{name}.log", children, cpus)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# --- the baseline server ---------------------------------------------------------------


async def serve_until_stopped(lifetime_s: float) -> None:
    """A helper process's main wait: until SIGTERM/SIGINT, its parent is gone, or
    `lifetime_s` passed, so a benchmark that dies never leaves it running."""
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    parent = os.getppid()
    deadline = time.monotonic() + lifetime_s
    while not stopped.is_set() and time.monotonic() < deadline and os.getppid() == parent:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await stopped.wait()


async def echo_server(port: int) -> None:
    """A bare aiohttp server: WebSocket `/echo` sends each binary message back
    unchanged; POST `/echo` answers with the body. Same WebSocket settings as the
    daemon's stream; no middlewares, no auth, no decoding."""

    async def ws_echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_MSG_BYTES)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    async def http_echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read(), content_type=MSGPACK)

    app = web.Application()
    app.router.add_get("/echo", ws_echo)
    app.router.add_post("/echo", http_echo)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        print(f"ready echo http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
        await serve_until_stopped(ECHO_LIFETIME_S)
    finally:
        await runner.cleanup()


# --- clients ---------------------------------------------------------------------------

Call = Callable[[int], Awaitable[None]]
Check = Callable[[Any, int], bool]


def is_add_reply(reply: Any, i: int) -> bool:
    return isinstance(reply, dict) and reply.get("result") == 3 and reply.get("id", i) == i


def is_ws_echo(reply: Any, i: int) -> bool:
    return isinstance(reply, dict) and reply.get("id") == i and reply.get("fn") == "add"


def is_http_echo(reply: Any, i: int) -> bool:
    return isinstance(reply, dict) and reply.get("fn") == "add"


def ws_call(ws: aiohttp.ClientWebSocketResponse, check: Check) -> Call:
    packb, unpackb = msgpack.packb, msgpack.unpackb

    async def call(i: int) -> None:
        await ws.send_bytes(packb({"id": i, "fn": "add", "args": [1, 2]}))
        msg = await ws.receive()
        if msg.type != WSMsgType.BINARY:
            raise BenchError(f"WebSocket answered {msg.type.name}: {msg.data!r}")
        reply = unpackb(msg.data)
        if not check(reply, i):
            raise BenchError(f"unexpected reply to call {i}: {reply!r}")

    return call


def http_call(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
              check: Check) -> Call:
    body = msgpack.packb({"fn": "add", "args": [1, 2]})
    unpackb = msgpack.unpackb
    headers = {"Content-Type": MSGPACK, **headers}

    async def call(i: int) -> None:
        async with session.post(url, data=body, headers=headers) as resp:
            data = await resp.read()
            status = resp.status
        reply = unpackb(data)
        if status != 200 or not check(reply, i):
            raise BenchError(f"HTTP {status} to call {i}: {reply!r}")

    return call


@dataclass
class Target:
    label: str  # in the table
    lat: str  # JSON key prefix of latencies: LAT_p50_us, LAT_p99_us
    rate: str  # of throughput: RATE_per_s
    pid: int  # the server process, for its CPU time
    calls: list[Call]  # one per client; calls[0] is the single client
    samples: dict[int, list[int]] = field(default_factory=lambda: {1: [], CLIENTS: []})
    rates: dict[int, list[float]] = field(default_factory=lambda: {1: [], CLIENTS: []})
    round_p50s: dict[int, list[float]] = field(default_factory=lambda: {1: [], CLIENTS: []})
    server_cpu_s: dict[int, float] = field(default_factory=lambda: {1: 0.0, CLIENTS: 0.0})
    client_cpu_s: dict[int, float] = field(default_factory=lambda: {1: 0.0, CLIENTS: 0.0})
    done: dict[int, int] = field(default_factory=lambda: {1: 0, CLIENTS: 0})


async def run_sequential(t: Target, plan: Plan) -> None:
    call = t.calls[0]
    for i in range(plan.seq_warmup):
        await call(i)
    samples = []
    cpu0, me0 = cpu_s(t.pid), time.process_time()
    start = time.perf_counter_ns()
    for i in range(plan.seq_calls):
        t0 = time.perf_counter_ns()
        await call(i)
        samples.append(time.perf_counter_ns() - t0)
    elapsed = (time.perf_counter_ns() - start) / 1e9
    t.server_cpu_s[1] += cpu_s(t.pid) - cpu0
    t.client_cpu_s[1] += time.process_time() - me0
    t.done[1] += plan.seq_calls + plan.seq_warmup
    t.samples[1] += samples
    t.rates[1].append(plan.seq_calls / elapsed)
    t.round_p50s[1].append(statistics.median(samples) / 1e3)


async def run_concurrent(t: Target, plan: Plan) -> None:
    """Every client calls back to back until the window closes; a call counts for
    throughput if it completed inside the window, for latency if it also began there."""
    start = time.perf_counter_ns()
    measure_from = start + int(plan.warmup_s * 1e9)
    until = measure_from + int(plan.window_s * 1e9)
    max_calls = int((plan.warmup_s + plan.window_s) * 1e6)  # a bound no client reaches

    async def client(call: Call) -> tuple[list[int], int, int]:
        samples: list[int] = []
        in_window = total = 0
        for i in range(max_calls):
            t0 = time.perf_counter_ns()
            if t0 >= until:
                break
            await call(i)
            t1 = time.perf_counter_ns()
            total += 1
            if measure_from <= t1 <= until:
                in_window += 1
                if t0 >= measure_from:
                    samples.append(t1 - t0)
        return samples, in_window, total

    cpu0, me0 = cpu_s(t.pid), time.process_time()
    async with asyncio.timeout(plan.warmup_s + plan.window_s + PHASE_SLACK_S):
        results = await asyncio.gather(*(client(c) for c in t.calls))
    t.server_cpu_s[CLIENTS] += cpu_s(t.pid) - cpu0
    t.client_cpu_s[CLIENTS] += time.process_time() - me0
    pooled = [s for samples, _, _ in results for s in samples]
    t.samples[CLIENTS] += pooled
    t.done[CLIENTS] += sum(r[2] for r in results)
    t.round_p50s[CLIENTS].append(statistics.median(pooled) / 1e3)
    t.rates[CLIENTS].append(sum(r[1] for r in results) / plan.window_s)


async def setup_daemon(session: aiohttp.ClientSession, url: str,
                       tokens: list[str]) -> list[str]:
    """Upload the kvstore image; create one VM per client, each owned by that client."""
    auth = {"Authorization": f"Bearer {tokens[0]}"}
    async with session.post(f"{url}/v1/images", data=KVSTORE.read_bytes(), headers=auth) as r:
        body = msgpack.unpackb(await r.read())
        if r.status != 201:
            raise BenchError(f"image upload: HTTP {r.status} {body!r}")
    digest = body["digest"]
    vms = []
    for token in tokens:
        async with session.post(f"{url}/v1/vms", data=msgpack.packb({"image": digest}),
                                headers={"Authorization": f"Bearer {token}",
                                         "Content-Type": MSGPACK}) as r:
            body = msgpack.unpackb(await r.read())
            if r.status != 201:
                raise BenchError(f"VM create: HTTP {r.status} {body!r}")
        vms.append(body["vm"])
    return vms


async def bench(daemon: Server, echo: Server, secret: Path, plan: Plan) -> list[Target]:
    authority = cluster_tokens(secret.parent)
    tokens = [authority.issue(f"bench-{k}", 3600) for k in range(CLIENTS)]
    auths = [{"Authorization": f"Bearer {tok}"} for tok in tokens]
    async with contextlib.AsyncExitStack() as stack:

        async def session(limit: int) -> aiohttp.ClientSession:
            s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit))
            return await stack.enter_async_context(s)

        async with asyncio.timeout(120):
            vms = await setup_daemon(await session(4), daemon.url, tokens)
            ws_daemon, ws_echo, http_daemon, http_echo = (
                await session(CLIENTS + 1), await session(CLIENTS + 1),
                await session(CLIENTS), await session(CLIENTS))
            d_socks = [await ws_daemon.ws_connect(f"{daemon.url}/v1/vms/{vm}/stream",
                                                  headers=a, max_msg_size=MAX_MSG_BYTES)
                       for vm, a in zip(vms, auths, strict=True)]
            e_socks = [await ws_echo.ws_connect(f"{echo.url}/echo", max_msg_size=MAX_MSG_BYTES)
                       for _ in range(CLIENTS)]
        dpid, epid = daemon.proc.pid, echo.proc.pid
        targets = [
            Target("ws (daemon)", "ws_call", "ws_calls", dpid,
                   [ws_call(ws, is_add_reply) for ws in d_socks]),
            Target("ws echo (bare)", "echo", "echo_calls", epid,
                   [ws_call(ws, is_ws_echo) for ws in e_socks]),
            Target("http (daemon)", "http_call", "http_calls", dpid,
                   [http_call(http_daemon, f"{daemon.url}/v1/vms/{vm}/call", a, is_add_reply)
                    for vm, a in zip(vms, auths, strict=True)]),
            Target("http echo (bare)", "http_echo", "http_echo_calls", epid,
                   [http_call(http_echo, f"{echo.url}/echo", {}, is_http_echo)
                    for _ in range(CLIENTS)]),
        ]
        for rnd in range(plan.rounds):
            order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
            for t in order:
                await run_sequential(t, plan)
            # At 64 clients each server runs right beside its echo, first in turn:
            # this host's speed drifts by tens of percent within a minute, and a
            # ratio of windows seconds apart measured the drift as much as the code.
            for pair in pairs_in_turn(targets, rnd):
                await run_concurrent(pair[0], plan)
                await run_concurrent(pair[1], plan)
        async with asyncio.timeout(30):
            for ws in d_socks + e_socks:
                await ws.close()
    return targets


def pairs_in_turn(targets: list[Target], rnd: int) -> list[tuple[Target, Target]]:
    """(daemon, echo) per transport, in round `rnd`'s order: who goes first alternates
    within each pair and between the pairs."""
    ws, ws_echo, http, http_echo = targets
    pairs = [(ws, ws_echo), (http, http_echo)]
    if rnd % 2:
        pairs = [(b, a) for a, b in reversed(pairs)]
    return pairs


# --- results ---------------------------------------------------------------------------


def summarize(targets: list[Target]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for t in targets:
        for n, sfx in ((1, ""), (CLIENTS, f"_{CLIENTS}")):
            samples = t.samples[n]
            out[f"{t.lat}_p50_us{sfx}"] = statistics.median(samples) / 1e3
            out[f"{t.lat}_p99_us{sfx}"] = statistics.quantiles(samples, n=100)[98] / 1e3
            out[f"{t.rate}_per_s{sfx}"] = statistics.median(t.rates[n])
            out[f"{t.lat}_p50_us_by_round{sfx}"] = t.round_p50s[n]
            out[f"{t.rate}_per_s_by_round{sfx}"] = t.rates[n]
            out[f"{t.lat}_server_cpu_us_per_call{sfx}"] = t.server_cpu_s[n] / t.done[n] * 1e6
            out[f"{t.lat}_client_cpu_us_per_call{sfx}"] = t.client_cpu_s[n] / t.done[n] * 1e6
            out[f"{t.lat}_samples{sfx}"] = len(samples)
    return out


def print_table(r: dict[str, Any], targets: list[Target]) -> None:
    print(f"{'transport':<18}{'clients':>8}{'p50 us':>10}{'p99 us':>10}{'calls/s':>11}"
          f"{'server cpu':>12}{'client cpu':>12}")
    for n, sfx in ((1, ""), (CLIENTS, f"_{CLIENTS}")):
        for t in targets:
            print(f"{t.label:<18}{n:>8}{r[f'{t.lat}_p50_us{sfx}']:>10.0f}"
                  f"{r[f'{t.lat}_p99_us{sfx}']:>10.0f}{r[f'{t.rate}_per_s{sfx}']:>11.0f}"
                  f"{r[f'{t.lat}_server_cpu_us_per_call{sfx}']:>12.1f}"
                  f"{r[f'{t.lat}_client_cpu_us_per_call{sfx}']:>12.1f}")
    pinned = r["machine"]["pinned"]
    where = (f"load generator on CPU {pinned['load_generator_cpus']}, servers on CPU "
             f"{pinned['server_cpus']}" if pinned else "not pinned")
    print(f"(cpu: us of CPU per call in the server process and in the load generator; "
          f"{r['machine']['cpus']} cores, {where})")
    ok = {True: "yes", False: "MISS"}
    m = r["meets"]
    print(f"\nws p50 vs echo p50: {r['ws_call_p50_us']:.0f} vs {r['echo_p50_us']:.0f} us = "
          f"{r['ws_call_p50_vs_echo']:.2f}x (target <= "
          f"{TARGETS['ws_p50_vs_echo_max']}x)  {ok[m['ws_call_p50_us']]}")
    print(f"ws {CLIENTS}-client throughput vs echo: {r['ws_calls_per_s_64']:.0f} vs "
          f"{r['echo_calls_per_s_64']:.0f} calls/s = "
          f"{r['ws_calls_per_s_64_vs_echo']:.2f} (target >= "
          f"{TARGETS['ws_calls_per_s_64_vs_echo_min']})  {ok[m['ws_calls_per_s_64_vs_echo']]}")
    by_round = r.get("ws_calls_per_s_64_vs_echo_by_round") or [0.0]
    print(f"  rounds (daemon and echo side by side): {min(by_round):.2f}-{max(by_round):.2f} "
          f"over {len(by_round)}")
    print(f"ws {CLIENTS}-client throughput: {r['ws_calls_per_s_64']:.0f} calls/s (target > "
          f"{TARGETS['ws_calls_per_s_64_min']})  {ok[m['ws_calls_per_s_64']]}")


def print_profile(path: Path) -> None:
    if not path.exists():
        print(f"\nno profile written ({path.name} missing)")
        return
    print("\ndaemon profile (cProfile, whole run; the timings above are slowed by it):")
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)


def run_neighbours(tmp: Path, children: list[Server], server_cpus: set[int] | None,
                   plan: neighbour.Plan) -> dict[str, Any]:
    """The isolation phases, on a daemon of their own (benchmarks/neighbour.py)."""
    daemon = start_daemon(tmp, None, children, server_cpus, name="neighbours",
                          settings=neighbour.SETTINGS)
    authority = cluster_tokens(tmp)
    tokens = {who: authority.issue(who, 3600) for who in ("neighbour", "hog", "booter")}
    try:
        return uvloop.run(neighbour.run(daemon.url, tokens, tmp / "neighbours", plan,
                                        KVSTORE.read_bytes(), MEMHOG.read_bytes()))
    except BaseException:
        print(f"neighbour daemon log tail:\n{daemon.log_tail()}", file=sys.stderr)
        raise
    finally:
        stop(daemon)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short round (< 1 minute)")
    parser.add_argument("--profile", action="store_true",
                        help="run the daemon under cProfile and print where its time goes "
                             "(figures are then not representative; no JSON is written)")
    parser.add_argument("--no-pin", action="store_true",
                        help="let the scheduler place the load generator and the servers "
                             "(default: generator on the first CPU, servers on the others)")
    parser.add_argument("--echo-server", type=int, metavar="PORT",
                        help="only run the baseline echo server on PORT (0: any)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help=f"where to write the JSON (default {RESULTS.relative_to(ROOT)})")
    parser.add_argument("--neighbours-only", action="store_true",
                        help="only the isolation phases (the JSON then holds only their keys)")
    args = parser.parse_args()
    if args.echo_server is not None:
        uvloop.run(echo_server(args.echo_server))
        return 0
    started = time.perf_counter()
    plan = QUICK if args.quick else FULL
    neighbour_plan = neighbour.QUICK if args.quick else neighbour.FULL
    split = cpu_split(not args.no_pin)
    server_cpus = None
    if split is not None:
        client_cpus, server_cpus = split
        os.sched_setaffinity(0, client_cpus)
    children: list[Server] = []
    targets: list[Target] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        profile_path = tmp / "daemon.prof" if args.profile else None
        try:
            if not args.neighbours_only:
                daemon = start_daemon(tmp, profile_path, children, server_cpus)
                echo = spawn("echo server", [sys.executable, str(Path(__file__).resolve()),
                                             "--echo-server", "0"], tmp / "echo.log", children,
                             server_cpus)
                try:
                    targets = uvloop.run(bench(daemon, echo, tmp / "cluster.key", plan))
                except BaseException:
                    print(f"daemon log tail:\n{daemon.log_tail()}", file=sys.stderr)
                    raise
                for server in reversed(children):
                    stop(server)
            isolation = (run_neighbours(tmp, children, server_cpus, neighbour_plan)
                         if not args.profile else {})
        finally:
            for server in reversed(children):
                stop(server)
        if profile_path is not None:
            print_profile(profile_path)
    results: dict[str, Any] = {}
    if targets:
        results = summarize(targets)
        results["ws_call_p50_vs_echo"] = results["ws_call_p50_us"] / results["echo_p50_us"]
        results["ws_calls_per_s_64_vs_echo"] = (results["ws_calls_per_s_64"]
                                                / results["echo_calls_per_s_64"])
        # Each round's pair (run side by side): their spread is the measurement's.
        results["ws_calls_per_s_64_vs_echo_by_round"] = [
            round(w / e, 3) for w, e in zip(results["ws_calls_per_s_by_round_64"],
                                            results["echo_calls_per_s_by_round_64"],
                                            strict=True)]
        results["targets"] = TARGETS
        results["meets"] = {
            "ws_call_p50_us": results["ws_call_p50_vs_echo"] <= TARGETS["ws_p50_vs_echo_max"],
            "ws_calls_per_s_64_vs_echo": results["ws_calls_per_s_64_vs_echo"]
                >= TARGETS["ws_calls_per_s_64_vs_echo_min"],
            "ws_calls_per_s_64": results["ws_calls_per_s_64"] > TARGETS["ws_calls_per_s_64_min"],
        }
    if isolation:
        results.update(isolation)
        results.setdefault("meets", {}).update(neighbour.meets(isolation))
        results["neighbor_plan"] = neighbour_plan.__dict__
    results["clients"] = CLIENTS
    results["plan"] = plan.__dict__
    results["daemon_settings"] = DAEMON_SETTINGS
    results["machine"] = {
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "aiohttp": aiohttp.__version__, "uvloop": getattr(uvloop, "__version__", "?"),
        "platform": platform.platform(),
        "pinned": None if split is None else {"load_generator_cpus": sorted(split[0]),
                                              "server_cpus": sorted(split[1])},
        "note": "the load generator runs on this machine's cores, beside the server"}
    results["quick"] = args.quick
    results["profiled"] = args.profile
    results["wall_s"] = time.perf_counter() - started
    print()
    if targets:
        print_table(results, targets)
    if isolation:
        neighbour.print_table(results)
    if args.profile:
        print(f"\nprofiled run: {RESULTS.relative_to(ROOT)} not written")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, (json.dumps(results, indent=2) + "\n").encode())
    print(f"\nwrote {args.out} in {results['wall_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
