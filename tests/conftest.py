"""Fixtures over real servers, each opt-in so that unit tests run with none: the real RabbitMQ
(started by `make test`), an nx-27017 MongoDB wire server and a SeaweedFS S3 server on free
ports under a temporary folder, and services run in-process under a random broker prefix so
that tests never meet a running stack's messages. The integration and end-to-end suites ask for
the broker in their own conftest."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from urllib.parse import urlparse

import pytest
from faststream.rabbit import RabbitBroker, RabbitMessage, RabbitQueue

from shared.messaging import Names, create_broker
from shared.rpc import CheckHealth, RpcClient, health_check
from shared.service import Setup, serve
from shared.settings import Settings
from tests.support import FileServer

AMQP_URL = Settings().amqp_url


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


@pytest.fixture(scope="session")
def rabbitmq() -> str:
    parsed = urlparse(AMQP_URL)
    if not _port_open(parsed.hostname or "127.0.0.1", parsed.port or 5672):
        pytest.exit(f"RabbitMQ is not reachable at {parsed.hostname}:{parsed.port}: run `make test`", 2)
    return AMQP_URL


@pytest.fixture(scope="session")
def mongo_url(tmp_path_factory) -> str:
    from deploy.local.stack import EmbeddedMongo

    server = EmbeddedMongo(tmp_path_factory.mktemp("mongo"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def settings_factory(mongo_url) -> Callable[..., Settings]:
    def make(**overrides) -> Settings:
        values = {
            "broker_prefix": f"test-{uuid.uuid4().hex[:8]}.",
            "mongo_url": mongo_url,
            "mongo_db_prefix": f"t{uuid.uuid4().hex[:8]}_",
            "admin_password": "admin-password",
            "api_key": "test-key",
            "rpc_timeout": 10.0,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture(scope="session")
async def service_runner() -> AsyncIterator[Callable[[str, Setup, Settings], Awaitable[None]]]:
    """Runs a service in this event loop until the session ends; returns once it answers."""
    tasks: list[asyncio.Task] = []

    async def run(service: str, setup: Setup, settings: Settings) -> None:
        task = asyncio.create_task(serve(service, setup, settings))
        tasks.append(task)
        rpc = RpcClient(settings.amqp_url, settings.broker_prefix, timeout=1.0)
        try:
            for _ in range(60):
                if task.done():
                    task.result()  # raises what made it stop
                try:
                    await rpc.call(health_check(service), CheckHealth())
                    return
                except Exception:
                    await asyncio.sleep(0.2)
            raise RuntimeError(f"{service} did not become healthy")
        finally:
            await rpc.close()

    yield run
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture(scope="session")
async def rpc_factory() -> AsyncIterator[Callable[[Settings], Awaitable[RpcClient]]]:
    clients: list[RpcClient] = []

    async def make(settings: Settings) -> RpcClient:
        client = RpcClient(settings.amqp_url, settings.broker_prefix, settings.rpc_timeout)
        await client.start()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


class EventLog:
    """Events seen on a queue bound to the events exchange, as a client would bind one."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, dict]] = asyncio.Queue()

    async def next(self, routing_key: str, timeout: float = 10.0) -> dict:
        async def wait() -> dict:
            while True:
                key, body = await self.queue.get()
                if key == routing_key:
                    return body

        return await asyncio.wait_for(wait(), timeout)


@pytest.fixture
async def event_log() -> AsyncIterator[Callable[[Settings, str], Awaitable[EventLog]]]:
    brokers: list[RabbitBroker] = []

    async def bind(settings: Settings, pattern: str) -> EventLog:
        log = EventLog()
        broker = create_broker(settings)
        names = Names(settings.broker_prefix)
        queue = RabbitQueue(
            f"{names.prefix}test-events.{uuid.uuid4().hex[:8]}",
            exclusive=True,
            auto_delete=True,
            routing_key=pattern,
        )

        @broker.subscriber(queue, names.events)
        async def collect(body: dict, message: RabbitMessage) -> None:
            await log.queue.put((message.raw_message.routing_key, body))

        await broker.start()
        brokers.append(broker)
        return log

    yield bind
    for broker in brokers:
        await broker.stop()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A SeaweedFS S3 server on free ports; yields settings overrides pointing at it."""
    from deploy.local.stack import EmbeddedS3, free_port

    server = EmbeddedS3(
        tmp_path_factory.mktemp("s3"), free_port(), access_key="test-access", secret_key="test-secret", bucket="esd"
    )
    server.start()
    yield {
        "s3_endpoint_url": server.endpoint_url,
        "s3_access_key": "test-access",
        "s3_secret_key": "test-secret",
        "s3_bucket": "esd",
    }
    server.stop()


@pytest.fixture(scope="session")
def file_server(tmp_path_factory) -> Iterator[FileServer]:
    server = FileServer(tmp_path_factory.mktemp("served"))
    yield server
    server.close()
