"""`cloudlet orchestrator --config FILE`: the orchestrator role as a process of its own.

It uses the node config's identity (key, certificate) and broker, holds the
orchestrator's part of the state directory (so it cannot run twice, nor beside
a daemon of the same config that runs the role too), serves its metrics on
`[orchestrator] metrics_port` when set, and stops cleanly on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

from aiohttp import web
from prometheus_client import generate_latest

from cloudlet.errors import ConfigError
from edge_agent.config import NodeConfig
from edge_agent.identity import load_node_trust
from edge_agent.orchestrator.metrics import OrchestratorMetrics
from edge_agent.orchestrator.runner import ORCHESTRATOR_DIR, Orchestrator
from edge_agent.statelock import StateLock

log = logging.getLogger(__name__)


async def serve(config: NodeConfig, stop: asyncio.Event | None = None) -> None:
    if not config.broker_url:
        raise ConfigError("the orchestrator needs a broker: set broker_url in [node]")
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    trust = load_node_trust(config)
    metrics = OrchestratorMetrics()
    with StateLock(config.state_path / ORCHESTRATOR_DIR, f"cloudlet orchestrator {config.name}"):
        orchestrator = Orchestrator(config, trust.identity, trust.verifier, metrics)
        async with contextlib.AsyncExitStack() as stack:
            port = config.orchestrator.metrics_port
            if port >= 0:
                runner = await _metrics_site(metrics, config.host, port)
                stack.push_async_callback(runner.cleanup)
            task = asyncio.create_task(orchestrator.run())
            print(f"orchestrator {orchestrator.holder} policy {orchestrator.policy.name} "
                  f"region {config.orchestrator.region}", flush=True)
            await stop.wait()
            orchestrator.stop()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _metrics_site(metrics: OrchestratorMetrics, host: str, port: int) -> web.AppRunner:
    async def render(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry),
                            content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", render)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"metrics http://{host}:{bound}/metrics", flush=True)
    return runner


def run(config: NodeConfig) -> None:
    level = os.environ.get("CLOUDLET_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level if level in logging.getLevelNamesMapping() else "INFO",
                        stream=sys.stderr,
                        format=f"%(asctime)s {config.name} orchestrator %(levelname)s "
                               "%(name)s: %(message)s")
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
