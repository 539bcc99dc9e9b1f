"""Helpers the integration and end-to-end tests share."""

from __future__ import annotations

import asyncio
import http.server
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest


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


def consumer_prefetch(queue: str) -> list[int]:
    """The prefetch count of each consumer of `queue`, as the broker reports it (rabbitmqctl on
    this host; the test is skipped where there is none)."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not on this host")
    listed = subprocess.run(
        ["rabbitmqctl", "list_consumers", "-q", "queue_name", "prefetch_count", "--formatter", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [consumer["prefetch_count"] for consumer in json.loads(listed) if consumer["queue_name"] == queue]
