"""Idempotent creation: a command sent again with the same `Idempotency-Key` (and the same
body) gets the first reply and creates nothing; the same key with another body is a 422; a
repeat while the first is still being handled waits for it, or is a 409 if it takes too long.
Keys are the caller's and the command's (one user's key never meets another's) and expire
after `ESD_IDEMPOTENCY_KEY_TTL` seconds.

Each service keeps its keys in its own database (`idempotency`); the gateway only passes the
header and a fingerprint of the body along with the command."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from shared.errors import Conflict, Unprocessable
from shared.rpc import Command

WAIT_FOR_FIRST_SECONDS = 10.0
# A first request still pending after this long died with its handler (its service killed, or
# the database gone before the key could be freed): a repeat takes the key over. Well above the
# callers' RPC timeout, which no live handler outlasts.
CLAIM_SECONDS = 30.0


class Idempotency:
    def __init__(self, db: AsyncDatabase, ttl: float) -> None:
        self.keys = db["idempotency"]
        self.ttl = ttl

    async def ensure_indexes(self) -> None:
        await self.keys.create_index([("key", ASCENDING)], unique=True)

    def wrap(self, command: Command, handler: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
        """`handler`, answering a repeated command with its first reply."""

        async def idempotent(request: Any) -> Any:
            key = getattr(request, "idempotency_key", None)
            if not key:
                return await handler(request)
            actor = getattr(getattr(request, "actor", None), "username", "")
            return await self._once(f"{command.service}.{command.name}:{actor}:{key}", command, request, handler)

        return idempotent

    async def _once(self, key: str, command: Command, request: Any, handler) -> Any:
        fingerprint = getattr(request, "request_fingerprint", None) or ""
        now = time.time()
        try:
            await self.keys.insert_one(
                {
                    "key": key,
                    "fingerprint": fingerprint,
                    "status": "pending",
                    "claimed_at": now,
                    "expires_at": now + self.ttl,
                }
            )
        except DuplicateKeyError:
            return await self._repeat(key, command, request, handler, fingerprint)
        try:
            result = await handler(request)
        except BaseException:
            await self.keys.delete_one({"key": key})  # nothing was done: the key is free again
            raise
        stored = None if result is None else result.__pydantic_serializer__.to_json(result).decode()
        await self.keys.update_one({"key": key}, {"$set": {"status": "done", "reply": stored}})
        return result

    async def _repeat(self, key: str, command: Command, request: Any, handler, fingerprint: str) -> Any:
        deadline = time.monotonic() + WAIT_FOR_FIRST_SECONDS
        while True:
            first = await self.keys.find_one({"key": key})
            if first is None or first["expires_at"] < time.time():  # expired (or undone): a new request
                await self.keys.delete_one({"key": key, "expires_at": {"$lt": time.time()}})
                return await self._once(key, command, request, handler)
            if first["fingerprint"] != fingerprint:
                raise Unprocessable("Idempotency-Key was used for another request; use a new key for a new request")
            if first["status"] == "done":
                if command.reply is None or first.get("reply") is None:
                    return None
                return command.reply.model_validate_json(first["reply"])
            claimed_at = first.get("claimed_at")
            if claimed_at is not None and claimed_at < time.time() - CLAIM_SECONDS:
                # only that dead claim is removed: of two repeats taking over, one wins the insert
                await self.keys.delete_one({"key": key, "status": "pending", "claimed_at": claimed_at})
                return await self._once(key, command, request, handler)
            if time.monotonic() > deadline:
                raise Conflict("a request with this Idempotency-Key is still being handled; try again later")
            await asyncio.sleep(0.05)
