"""Helpers the integration and end-to-end tests share."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
from pathlib import Path


class FileServer:
    """A local HTTP server for by-URL downloads: files from a folder, and `/redirect/<name>`
    answering 302 to `/files/<name>`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(server.folder), **kwargs)

            def do_GET(self):
                if self.path.startswith("/redirect/"):
                    self.send_response(302)
                    self.send_header("Location", "/files/" + self.path.removeprefix("/redirect/"))
                    self.end_headers()
                    return
                self.path = self.path.removeprefix("/files")
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


def wait_for(predicate, *, timeout: float = 60.0, interval: float = 0.2, what: str = "condition"):
    """Poll until `predicate()` returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


async def wait_for_async(predicate, *, timeout: float = 60.0, interval: float = 0.1, what: str = "condition"):
    """Await `predicate()` until it returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


class EventListener:
    """A client's own queue bound to the events exchange, read from synchronous tests."""

    def __init__(self, amqp_url: str, exchange: str, pattern: str) -> None:
        import queue as queues

        self.amqp_url, self.exchange, self.pattern = amqp_url, exchange, pattern
        self.received: queues.Queue = queues.Queue()
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _consume(self) -> None:
        import json

        import aio_pika

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
