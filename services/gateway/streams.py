"""Server-Sent Events from the event log.

Every event on the bus is also kept, in order, in a RabbitMQ stream (`esd.events.log`, see
`shared.messaging.Names.event_log`). A client's SSE connection reads that stream from where it
asks: the next event (a live follower), the offset after its `Last-Event-ID` (a resumed one,
on any gateway replica), or the creation of the job it follows. The stream offset is the SSE
event id; the event's own `id` is in its data, for a client that wants to drop a repeat.

What a caller sees follows its permissions: its own jobs and trainings, or all of them with the
`:all` permission; the other domains with their list permission."""

from __future__ import annotations

import asyncio
import fnmatch
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aio_pika
import orjson
import structlog

from shared.contracts.identity import Principal
from shared.messaging import Names
from shared.permissions import allows, allows_any

log = structlog.get_logger(__name__)

KEEP_ALIVE_SECONDS = 15.0

# domain of an event -> who may see it: (the permission that shows every event, those that show
# the caller's own jobs' events, or, in a domain without owners, every one)
_READERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "inference": ("inference:all", ("inference:list", "inference:create")),
    "training": ("train:all", ("train:list", "train:create")),
    "checkpoint": ("checkpoint:all", ("checkpoint:list",)),
    "endpoint": ("sagemaker_endpoint:all", ("sagemaker_endpoint:list",)),
    "user": ("user:all", ("user:list",)),
    "role": ("role:all", ("role:list",)),
}
_OWNED = {"inference", "training"}  # their events name the job's owner


def may_see(principal: Principal, routing_key: str, event: dict[str, Any]) -> bool:
    """Whether a caller may see an event: every one of a domain with its `:all` permission;
    with a lesser one, its own jobs' events, or every event of a domain without owners."""
    domain = routing_key.split(".", 1)[0]
    readers = _READERS.get(domain)
    if readers is None:
        return False
    everything, some = readers
    if allows(principal.permissions, everything):
        return True
    if not allows_any(principal.permissions, some):
        return False
    return domain not in _OWNED or event.get("owner") == principal.username


def wanted(routing_key: str, patterns: list[str]) -> bool:
    """`?type=inference.*,training.completed`: shell-style patterns; none means everything."""
    return not patterns or any(fnmatch.fnmatchcase(routing_key, pattern) for pattern in patterns)


@dataclass
class LoggedEvent:
    offset: int
    routing_key: str
    body: bytes

    def data(self) -> dict[str, Any]:
        return orjson.loads(self.body)

    def sse(self) -> bytes:
        return b"id: %d\nevent: %s\ndata: %s\n\n" % (self.offset, self.routing_key.encode(), self.body)


class EventLog:
    """Reads the event log stream; one channel per reader."""

    def __init__(self, amqp_url: str, names: Names) -> None:
        self.amqp_url = amqp_url
        self.names = names
        self.connection: aio_pika.abc.AbstractRobustConnection | None = None

    async def start(self) -> None:
        self.connection = await aio_pika.connect_robust(self.amqp_url)
        channel = await self.connection.channel()
        # the gateway may start before any service: the exchange and the log may be new
        exchange = await channel.declare_exchange(self.names.events.name, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = self.names.event_log
        declared = await channel.declare_queue(queue.name, durable=True, arguments=queue.arguments)
        await declared.bind(exchange, routing_key="#")
        await channel.close()

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()
            self.connection = None

    async def read(self, start: int | datetime | str = "next") -> AsyncIterator[LoggedEvent | None]:
        """Events from `start` (an offset, a time, or `next`/`first`) on, as they come; None
        when nothing came for a while (the caller's cue for a keep-alive)."""
        assert self.connection is not None
        channel = await self.connection.channel()
        try:
            await channel.set_qos(prefetch_count=200)
            queue = await channel.get_queue(self.names.event_log.name, ensure=False)
            arrived: asyncio.Queue[LoggedEvent] = asyncio.Queue()

            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                offset = int((message.headers or {}).get("x-stream-offset", -1))
                await arrived.put(LoggedEvent(offset, message.routing_key or "", message.body))
                await message.ack()

            await queue.consume(on_message, arguments={"x-stream-offset": start})
            while True:
                try:
                    yield await asyncio.wait_for(arrived.get(), KEEP_ALIVE_SECONDS)
                except TimeoutError:
                    yield None
        finally:
            await channel.close()


def resume_offset(last_event_id: str | None) -> int | None:
    """The offset after a client's `Last-Event-ID`, or None when it names none (or nonsense)."""
    if last_event_id and last_event_id.strip().isdigit():
        return int(last_event_id.strip()) + 1
    return None
