"""RabbitMQ through FastStream: the one place that names exchanges and queues, builds the
broker, and carries events and work.

- Events: past-tense models published persistently on the topic exchange `esd.events` with
  routing key `<domain>.<event>`; users bind their own queues there.
- Work: commands that start long work go to durable queues with a dead-letter queue.
- Request/reply (RPC) lives in `shared/rpc.py`.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, ClassVar, TypeVar

import structlog
from faststream.rabbit import ExchangeType, RabbitBroker, RabbitExchange, RabbitQueue
from pydantic import BaseModel, Field

from shared.settings import Settings

log = structlog.get_logger(__name__)

EVENTS_EXCHANGE = "esd.events"
DEAD_LETTER_EXCHANGE = "esd.dead-letter"

T = TypeVar("T", bound=BaseModel)


class Event(BaseModel):
    """Base of every event; subclasses set `routing_key` (`<domain>.<event>`). Every event
    carries its own id (a consumer that sees one twice drops the repeat), when it happened,
    and the version of its schema (fields are added, never repurposed)."""

    routing_key: ClassVar[str]

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    occurred_at: float = Field(default_factory=time.time)
    version: int = 1


class Names:
    """Exchange and queue names, under the deployment's broker prefix."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    @property
    def events(self) -> RabbitExchange:
        return RabbitExchange(f"{self.prefix}{EVENTS_EXCHANGE}", type=ExchangeType.TOPIC, durable=True)

    @property
    def dead_letters(self) -> RabbitExchange:
        return RabbitExchange(f"{self.prefix}{DEAD_LETTER_EXCHANGE}", type=ExchangeType.DIRECT, durable=True)

    def work_queue(self, name: str) -> RabbitQueue:
        """A durable queue of commands that start long work. A message its consumer rejects
        (an unexpected error) goes to `<name>.dead` with its headers, never lost and never
        retried forever; a consumer that dies leaves its message to be redelivered."""
        return RabbitQueue(
            f"{self.prefix}{name}",
            durable=True,
            arguments={
                "x-dead-letter-exchange": f"{self.prefix}{DEAD_LETTER_EXCHANGE}",
                "x-dead-letter-routing-key": f"{self.prefix}{name}",
            },
        )

    @property
    def event_log(self) -> RabbitQueue:
        """Every event, kept in order for a week (a RabbitMQ stream): what Server-Sent Events
        clients read from, live or from where they left off."""
        return RabbitQueue(
            f"{self.prefix}{EVENTS_EXCHANGE}.log",
            durable=True,
            routing_key="#",
            arguments={"x-queue-type": "stream", "x-max-age": "7D", "x-max-length-bytes": 2_000_000_000},
        )

    def heartbeat_queue(self, name: str) -> RabbitQueue:
        """Where a pool's workers beat: a beat older than 30 s says nothing any more, so the
        queue drops it (no dead letters)."""
        return RabbitQueue(f"{self.prefix}{name}", durable=True, arguments={"x-message-ttl": 30_000})

    def replica_queue(self, owner: str, routing_key: str) -> RabbitQueue:
        """A queue of one process alone, gone with it, bound to the events exchange: for what
        every replica must hear (not one of them), such as a change that empties a cache."""
        return RabbitQueue(
            f"{self.prefix}{owner}.{uuid.uuid4().hex[:12]}.{routing_key.replace('*', 'any')}",
            exclusive=True,
            auto_delete=True,
            routing_key=routing_key,
        )

    def dead_letter_queue(self, name: str) -> RabbitQueue:
        return RabbitQueue(f"{self.prefix}{name}.dead", durable=True, routing_key=f"{self.prefix}{name}")

    def event_queue(self, service: str, name: str, routing_key: str) -> RabbitQueue:
        """A durable queue owned by `service`, bound to the events exchange."""
        return RabbitQueue(f"{self.prefix}{service}.events.{name}", durable=True, routing_key=routing_key)


def create_broker(settings: Settings, *, graceful_timeout: float = 15.0) -> RabbitBroker:
    # FastStream logs every message at `log_level`: at DEBUG it is filtered out (its default
    # per-message logging costs more than a fast handler's work), while a handler's exception
    # is still logged at ERROR.
    return RabbitBroker(
        settings.amqp_url,
        logger=logging.getLogger("faststream"),
        log_level=logging.DEBUG,
        graceful_timeout=graceful_timeout,
        # back within a second of the broker (as the RPC connections, shared/amqp.py): while
        # the RPC is back and this is not, changes are made whose events wait for the sweep
        reconnect_interval=1.0,
    )


async def declare_work_queue(broker: RabbitBroker, names: Names, name: str) -> None:
    """Declare a work queue with its dead-letter queue (idempotent; the broker must be
    connected)."""
    dead_letters = await broker.declare_exchange(names.dead_letters)
    dead = await broker.declare_queue(names.dead_letter_queue(name))
    await dead.bind(dead_letters, routing_key=f"{names.prefix}{name}")
    await broker.declare_queue(names.work_queue(name))


async def declare_event_log(broker: RabbitBroker, names: Names) -> None:
    """The events exchange and the stream that keeps every event (idempotent; the broker must
    be connected). Every service declares both at start, so no event goes unlogged."""
    exchange = await broker.declare_exchange(names.events)
    log = await broker.declare_queue(names.event_log)
    await log.bind(exchange, routing_key="#")


class QueueDepths:
    """Reads how many messages wait in queues (what scales worker pools). Every read is a fresh
    passive declare: the broker's cached declarations keep the count of their first answer."""

    def __init__(self, amqp_url: str) -> None:
        self.amqp_url = amqp_url
        self.connection: Any = None
        self.channel: Any = None

    async def depth(self, queue: str) -> int:
        import aio_pika
        from aiormq.exceptions import ChannelClosed

        if self.connection is None:
            self.connection = await aio_pika.connect_robust(self.amqp_url)
        if self.channel is None or self.channel.is_closed:
            self.channel = await self.connection.channel()
        try:
            declared = await self.channel.declare_queue(queue, passive=True, robust=False)
        except ChannelClosed:  # no such queue (yet): nothing waits in it
            self.channel = None
            return 0
        return declared.declaration_result.message_count or 0

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()


async def send_work(broker: RabbitBroker, names: Names, queue: str, message: BaseModel) -> None:
    """Publish a command to a work queue: persistent, confirmed by the broker."""
    await broker.publish(
        message.model_dump_json(),
        queue=names.work_queue(queue),
        persist=True,
        content_type="application/json",
    )


class EventPublisher:
    def __init__(self, broker: RabbitBroker, names: Names) -> None:
        self.broker = broker
        self.names = names

    async def publish(self, event: Event) -> None:
        """An event straight to the exchange (persistent, confirmed by the broker). Events that
        announce a stored change go through the store's outbox instead (shared/outbox.py)."""
        await self.publish_raw(event.routing_key, event.model_dump(mode="json"))

    async def publish_raw(self, routing_key: str, body: dict[str, Any]) -> None:
        await self.broker.publish(
            body,
            exchange=self.names.events,
            routing_key=routing_key,
            persist=True,
            content_type="application/json",
            message_type=routing_key,
        )
