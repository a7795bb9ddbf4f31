"""Run one cloudlet daemon: data plane, control plane, checkpoints, clean shutdown.

Shutdown order (SIGTERM or Ctrl-C) is what makes a restart lose nothing: stop
listening, close WebSocket streams, let in-flight requests finish, checkpoint
every VM (write, fsync, rename), mark the node offline on the broker, exit.
The next start restores every checkpoint.

One daemon per state directory (edge_agent.statelock): a second one exits at
once, before it touches anything. A shutdown that could not save every VM (a
full disk) still completes, then raises `StorageFull`: the process exits
non-zero, and each such VM keeps its last good checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from aiohttp import web

from cloudlet.errors import MalformedRequest, StaleDecision, StorageFull
from cloudlet.trust.gate import ControlGate
from edge_agent.app import MOVER, build_app
from edge_agent.auth import SECRET_FILE, Principal
from edge_agent.config import NodeConfig
from edge_agent.connections import GuardedAppRunner
from edge_agent.control import CommandHandler, ControlPlane
from edge_agent.handoff import Mover
from edge_agent.identity import load_node_trust
from edge_agent.metrics import Metrics
from edge_agent.orchestrator.metrics import OrchestratorMetrics
from edge_agent.orchestrator.runner import ORCHESTRATOR_DIR, Orchestrator
from edge_agent.peers import PeerDirectory
from edge_agent.statelock import StateLock
from edge_agent.vm_host import VMHost

log = logging.getLogger(__name__)

# Commands reach a handler only after the gate believed them: signed by an
# orchestrator or operator of the cluster, fresh, of a current epoch.
COMMANDER = Principal("control-plane", is_peer=True, is_operator=True)
SHUTDOWN_GRACE_S = 10.0  # in-flight requests get this long to finish
CANCEL_AGAIN_S = 1.0  # a background task not ended by its cancel is cancelled again
__all__ = ["SECRET_FILE", "run", "serve"]


async def serve(config: NodeConfig, stop: asyncio.Event | None = None) -> None:
    """Serve until `stop` is set (or SIGTERM/SIGINT when run as the main program).

    Raises `StateDirLocked` at once if another process holds the state directory,
    and `StorageFull` after a clean stop that could not save every VM."""
    with StateLock(config.state_path, f"cloudlet agent {config.name}"):
        unsaved = await _serve(config, stop or asyncio.Event())
    if unsaved:
        shown = ", ".join(unsaved[:5]) + (", ..." if len(unsaved) > 5 else "")
        raise StorageFull(f"{len(unsaved)} VMs could not be saved at shutdown ({shown}); "
                          "each keeps its last good checkpoint (see the log)")


async def _serve(config: NodeConfig, stop: asyncio.Event) -> list[str]:
    """The daemon's life, with its state directory held; returns the VMs that could
    not be saved at shutdown."""
    unsaved: list[str] = []
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    trust = load_node_trust(config)
    metrics = Metrics()
    ssl_context = None
    if config.tls_cert_file:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    async with VMHost(config) as host:
        metrics.watch_storage(host.storage)
        peers = PeerDirectory(config.name)
        app = build_app(config, host, trust, metrics, peers)
        runner = GuardedAppRunner(app, header_timeout_s=config.header_timeout_s,
                                  idle_timeout_s=config.idle_timeout_s,
                                  on_timeout=metrics.head_timeouts.inc,
                                  handle_signals=False, access_log=None,
                                  shutdown_timeout=SHUTDOWN_GRACE_S)
        await runner.setup()
        try:
            site = web.TCPSite(runner, config.host, config.port, ssl_context=ssl_context)
            await site.start()
            port = runner.addresses[0][1]
            config = replace(config, port=port)  # the real port when 0 was asked for
            mover = app[MOVER]
            control = (ControlPlane(config, host, metrics, _commands(host, mover),
                                    identity=trust.identity, peers=peers,
                                    gate=ControlGate(trust.verifier,
                                                     window_s=config.control_window_s))
                       if config.broker_url else None)
            mover.on_event = _events_to(control, metrics)
            # VMs that were arriving when this cloudlet stopped: ask their sources.
            await mover.live.recover(mover.peer_client)
            # A parent process (cloudlet up, tests) waits for this line.
            print(f"ready {config.name} {config.endpoint}", flush=True)
            log.info("cloudlet %s serving on %s with %d VMs", config.name, config.endpoint,
                     len(host.vms))
            async with contextlib.AsyncExitStack() as roles, asyncio.TaskGroup() as tg:
                background = [tg.create_task(_checkpoint_loop(host, config, metrics))]
                stoppers: list[Callable[[], None]] = []
                if control is not None:
                    background.append(tg.create_task(control.run()))
                    stoppers.append(control.stop)
                if control is not None and config.orchestrator.enabled:
                    roles.enter_context(StateLock(config.state_path / ORCHESTRATOR_DIR,
                                                  f"the orchestrator of {config.name}"))
                    orchestrator = Orchestrator(config, trust.identity, trust.verifier,
                                                OrchestratorMetrics(metrics.registry))
                    background.append(tg.create_task(orchestrator.run()))
                    stoppers.append(orchestrator.stop)
                try:
                    await stop.wait()
                    log.info("shutting down: finishing requests, checkpointing VMs")
                    await runner.cleanup()  # stop listening, close streams, finish requests
                    unsaved = await host.shutdown()
                    if control is not None:
                        await control.say_goodbye()
                finally:  # also when a background task failed and the group cancels the rest
                    for stop_reconnecting in stoppers:
                        stop_reconnecting()
                await _cancel_until_done(background)
        finally:
            await runner.cleanup()
    return unsaved


async def _cancel_until_done(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel `tasks`, again every second until each has ended: on Python 3.11 a
    cancel that lands as an awaited operation completes (`asyncio.wait_for`, which
    aiomqtt's publish uses) is dropped, and the task would run on."""
    pending = [t for t in tasks if not t.done()]
    while pending:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=CANCEL_AGAIN_S)
        pending = [t for t in pending if not t.done()]


async def _checkpoint_loop(host: VMHost, config: NodeConfig, metrics: Metrics) -> None:
    while True:
        await asyncio.sleep(config.checkpoint_interval_s)
        metrics.checkpoints.inc((await host.checkpoint_all()).written)


def _events_to(control: ControlPlane | None,
               metrics: Metrics) -> Callable[[dict[str, Any]], None]:
    def publish(event: dict[str, Any]) -> None:
        metrics.record_migration(event)
        if control is not None:
            control.publish_event(event)
    return publish


def _commands(host: VMHost, mover: Mover) -> dict[str, CommandHandler]:
    async def ping(command: dict[str, Any]) -> dict[str, Any]:
        return {"vms": len(host.vms)}

    async def checkpoint(command: dict[str, Any]) -> dict[str, Any]:
        done = await host.checkpoint_all(force=True)
        return {"written": done.written, "failed": sorted(done.failed)}

    async def migrate(command: dict[str, Any]) -> dict[str, Any]:
        """`{"op": "migrate", "vm": ID, "to": NODE, "mode"?}` (the orchestrator). The
        destination is a node known from signed presence: an order names no URL."""
        vm_id, to = command.get("vm"), command.get("to")
        mode = command.get("mode", "live")
        generation = command.get("generation")
        if not isinstance(vm_id, str) or not isinstance(to, str) or not isinstance(mode, str) \
                or (generation is not None and type(generation) is not int):
            raise MalformedRequest("migrate takes 'vm' and 'to' (a node known from presence), "
                                   "and optionally the VM's 'generation' it was decided at")
        hosted = host.get(vm_id, COMMANDER)
        if generation is not None and generation != hosted.generation:
            # One decision moves a VM once: an order decided before the VM's last move
            # (a retry or a new leader repeating it) must not move it again.
            raise StaleDecision(f"the order was decided at generation {generation}; VM "
                                f"{vm_id} is at {hosted.generation} (it moved since)")
        return await mover.move(hosted, mover.peers.target(to), mode)

    return {"ping": ping, "checkpoint": checkpoint, "migrate": migrate}


def run(config: NodeConfig) -> None:
    """Run the daemon in this process, under uvloop where available."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {config.name} %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
