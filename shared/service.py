"""How every service process runs: logging, the broker, its RPC server (with the health
command), its own subscribers; then serve until SIGTERM/SIGINT and stop cleanly (requests and
messages in hand finish first)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import structlog
from faststream.rabbit import RabbitBroker

from shared.idempotency import Idempotency
from shared.logging import configure_logging
from shared.messaging import EventPublisher, Names, create_broker, declare_event_log
from shared.metrics import serve_metrics
from shared.outbox import Outbox
from shared.rpc import CheckHealth, Health, RpcClient, RpcServer, health_check
from shared.settings import Settings, get_settings

log = structlog.get_logger(__name__)


@dataclass
class Runtime:
    """What a service's set-up gets: the broker for its subscribers and events, its RPC server
    to register commands on, an RPC client to call other services, and an exit stack for what
    it opens (database clients...)."""

    service: str
    settings: Settings
    broker: RabbitBroker
    names: Names
    rpc: RpcServer
    stack: AsyncExitStack
    _client: RpcClient | None = field(default=None, repr=False)
    _outbox: Outbox | None = field(default=None, repr=False)

    @property
    def events(self) -> EventPublisher:
        return EventPublisher(self.broker, self.names)

    def idempotency(self, db) -> Idempotency:
        """Keys of repeated creating commands, kept in the service's database `db`."""
        return Idempotency(db, self.settings.idempotency_key_ttl)

    @property
    def outbox(self) -> Outbox:
        """This service's relay of the events its stores write (swept while it runs)."""
        if self._outbox is None:
            self._outbox = Outbox(self.events)
        return self._outbox

    def client(self) -> RpcClient:
        """This process's client for calling other services (opened on first call)."""
        if self._client is None:
            self._client = RpcClient(self.settings.amqp_url, self.names.prefix, self.settings.rpc_timeout)
            self.stack.push_async_callback(self._client.close)
        return self._client


# A service's set-up registers its commands and subscribers and may return a coroutine to run
# once connected to the broker and before anything is consumed (indexes, bootstrap).
Setup = Callable[[Runtime], Awaitable[Callable[[], Awaitable[None]] | None]]


async def serve(service: str, setup: Setup, settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    names = Names(settings.broker_prefix)
    async with AsyncExitStack() as stack:
        runtime = Runtime(
            service=service,
            settings=settings,
            broker=create_broker(settings),
            names=names,
            rpc=RpcServer(settings.amqp_url, names.prefix),
            stack=stack,
        )
        prepare = await setup(runtime)

        async def health(_: CheckHealth) -> Health:
            return Health(service=service)

        runtime.rpc.register(health_check(service), health)
        await runtime.broker.connect()
        stack.push_async_callback(runtime.broker.stop)
        await declare_event_log(runtime.broker, names)
        if prepare is not None:
            await prepare()
        if runtime._outbox is not None:  # events a process before this one wrote but did not send
            sweeping = asyncio.create_task(runtime._outbox.sweep_forever())
            stack.callback(sweeping.cancel)
        await runtime.broker.start()
        serve_metrics(settings, service)  # before the health check answers: the stack then finds it
        await runtime.rpc.start()
        stack.push_async_callback(runtime.rpc.stop)
        log.info("service.ready", amqp=settings.amqp_url.rsplit("@", 1)[-1])
        await until_stopped()
        log.info("service.stopping")


async def until_stopped() -> None:
    """Wait for SIGTERM or SIGINT (or for the caller to be cancelled)."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


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
