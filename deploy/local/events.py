"""A client's view of the platform's events: its own queue bound to the events exchange, read
from synchronous code (tests, benchmarks, scripts)."""

from __future__ import annotations

import asyncio
import json
import queue as queues
import threading
import time

import aio_pika


class EventListener:
    """A client's own queue bound to the events exchange, read from synchronous tests."""

    def __init__(self, amqp_url: str, exchange: str, pattern: str) -> None:
        self.amqp_url, self.exchange, self.pattern = amqp_url, exchange, pattern
        self.received: queues.Queue = queues.Queue()
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _consume(self) -> None:
        self.connection = await aio_pika.connect_robust(self.amqp_url)
        channel = await self.connection.channel()
        exchange = await channel.declare_exchange(self.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key=self.pattern)

        async def on_message(message) -> None:
            async with message.process():
                self.received.put((message.routing_key, json.loads(message.body)))

        await queue.consume(on_message)
        self.ready.set()

    def __enter__(self) -> EventListener:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._consume(), self.loop).result(timeout=30)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.connection.close(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def until(self, done, timeout: float = 120.0) -> list[tuple[str, dict]]:
        """Every event up to and including the first one for which `done(key, body)` holds."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            key, body = self.received.get(timeout=max(0.1, deadline - time.monotonic()))
            seen.append((key, body))
            if done(key, body):
                return seen
