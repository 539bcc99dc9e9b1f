"""How every service process runs: logging, the broker, a health RPC, its own subscribers,
then serve until SIGTERM/SIGINT and stop cleanly (in-flight messages finish first)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from typing import Any

import structlog
from faststream.rabbit import RabbitBroker
from pydantic import BaseModel

from shared.logging import configure_logging
from shared.messaging import Names, create_broker, rpc_handler
from shared.settings import Settings, get_settings

log = structlog.get_logger(__name__)

# A service's set-up: given the broker, its names and an exit stack for what it opens (database
# clients...), it registers its subscribers and may return a coroutine to run once connected to
# the broker and before its subscribers consume (indexes, bootstrap).
Setup = Callable[[RabbitBroker, Names, Settings, AsyncExitStack], Awaitable[Callable[[], Awaitable[None]] | None]]


class HealthCheck(BaseModel):
    pass


class Health(BaseModel):
    service: str
    status: str = "ok"


def register_health(broker: RabbitBroker, names: Names, service: str) -> None:
    @broker.subscriber(names.rpc_queue(service, "health"))
    @rpc_handler
    async def health(_: HealthCheck) -> Health:
        return Health(service=service)


async def serve(service: str, setup: Setup, settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    names = Names(settings.broker_prefix)
    broker = create_broker(settings)
    async with AsyncExitStack() as stack:
        prepare = await setup(broker, names, settings, stack)
        register_health(broker, names, service)
        await broker.connect()
        stack.push_async_callback(broker.stop)
        await broker.declare_exchange(names.events)
        if prepare is not None:
            await prepare()
        await broker.start()
        log.info("service.ready", amqp=settings.amqp_url.rsplit("@", 1)[-1])
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await stopping.wait()
        log.info("service.stopping")


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run a process's main coroutine on uvloop (shipped with uvicorn[standard])."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main)
    else:
        uvloop.run(main)


def main(service: str, setup: Setup) -> None:
    settings = get_settings()
    configure_logging(service, fmt=settings.log_format, level=settings.log_level)
    run(serve(service, setup, settings))
