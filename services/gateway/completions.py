"""Waiting for jobs to finish, for the Real-time calls that answer with the finished job.

Each gateway replica binds its own queue to `inference.succeeded` and `inference.failed` and
wakes the callers waiting on those jobs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

from shared.errors import JobTimeout


class Completions:
    def __init__(self) -> None:
        self.waiting: dict[str, list[asyncio.Future]] = {}

    def finished(self, inference_id: str) -> None:
        for future in self.waiting.pop(inference_id, []):
            if not future.done():
                future.set_result(None)

    @asynccontextmanager
    async def watch(self, inference_id: str):
        """Register before starting the job, so that a fast finish is not missed."""
        future = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(inference_id, []).append(future)
        try:
            yield future
        finally:
            futures = self.waiting.get(inference_id, [])
            if future in futures:
                futures.remove(future)
            if not futures:
                self.waiting.pop(inference_id, None)

    async def wait(
        self,
        future: asyncio.Future,
        *,
        finished: Callable[[], Awaitable[bool]],
        timeout: float,
        inference_id: str,
    ) -> None:
        """Until the event arrives or `finished()` says so (checked now and then, in case an
        event was missed), at most `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not future.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise JobTimeout(
                    f"inference {inference_id} did not finish within {timeout:g} s; "
                    f"it goes on: poll GET /inferences/{inference_id}"
                )
            try:
                await asyncio.wait_for(asyncio.shield(future), min(remaining, 2.0))
            except TimeoutError:
                if await finished():
                    return
