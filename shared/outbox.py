"""Events written with the state change they announce, then relayed: a transactional outbox
that needs no transactions.

A store that changes a document and has an event to tell writes the event INTO that document,
in the same write (`{"$set": {..., **outbox.entries(event)}}`): the change and its event are
stored together or not at all. Right after, the store asks the relay to send what the document
holds (`Outbox.send`): each event is published with the broker's confirmation, then removed
from the document. A process that dies between the write and the publish leaves the event in
the document, and the relay's sweep (at start, then every few seconds) publishes it. An event
may so be published twice; every event has an id and consumers drop repeats.

A deleted document is kept as a tombstone (`deleted: true`) until its last event is out, so
its deletion can be announced; stores leave tombstones out of their queries (`LIVE`).

Events sit in a map (`outbox.<event id>`), not an array: setting and unsetting one key is what
every MongoDB (and the embedded server) does the same way.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable
from typing import Any

import structlog
from pymongo.asynchronous.collection import AsyncCollection

from shared.errors import outage
from shared.messaging import Event, EventPublisher

log = structlog.get_logger(__name__)

FIELD = "outbox"
PENDING = {FIELD: {"$type": "object", "$ne": {}}}
LIVE = {"deleted": {"$nin": [True]}}  # what stores query: not tombstones (`$ne` misses in some servers)
SWEEP_SECONDS = 5.0
# A test hook: a process that would publish an event of this type exits right before (to show
# that the event is not lost). Never set in production.
CRASH_BEFORE_PUBLISHING = os.environ.get("ESD_TEST_CRASH_BEFORE_PUBLISHING", "")


def _at(entry: dict[str, Any]) -> float:
    return entry["body"].get("occurred_at", 0.0)


def _entry(event: Event) -> dict[str, Any]:
    return {"routing_key": event.routing_key, "body": event.model_dump(mode="json")}


def entries(*events: Event) -> dict[str, Any]:
    """`$set` fields that put events into a document's outbox."""
    return {f"{FIELD}.{event.id}": _entry(event) for event in events}


def embedded(*events: Event) -> dict[str, Any]:
    """The outbox field of a new document (`insert_one`, `$setOnInsert`)."""
    return {FIELD: {event.id: _entry(event) for event in events}}


def tombstone(*events: Event) -> dict[str, Any]:
    """The update that deletes a document and announces it."""
    return {"$set": {"deleted": True, **entries(*events)}}


class Outbox:
    """Relays the events stores write into their documents (see the module docstring)."""

    def __init__(self, publisher: EventPublisher) -> None:
        self.publisher = publisher
        self.collections: list[AsyncCollection] = []

    def watch(self, *collections: AsyncCollection) -> None:
        """Collections whose documents may hold events: swept for leftovers."""
        self.collections.extend(collections)

    async def send(
        self, collection: AsyncCollection, selector: dict[str, Any], *, older_than: float = 0.0, sweeping: bool = False
    ) -> None:
        """Publish the events the selected documents hold (those that happened at least
        `older_than` seconds ago), and remove each once confirmed. A writer's change is made
        when it calls this: if the broker cannot take the events now, they wait in their
        document for the sweep, and the writer's caller is not told that the change failed."""
        settled = time.time() - older_than
        async for doc in collection.find({**selector, **PENDING}, {FIELD: 1, "deleted": 1}):
            pending = [(event_id, entry) for event_id, entry in self._pending(doc) if _at(entry) <= settled]
            if len(pending) < len(doc.get(FIELD) or {}):
                continue  # its writer is sending the rest now (or the next sweep will)
            for event_id, entry in pending:
                if CRASH_BEFORE_PUBLISHING and entry["routing_key"] == CRASH_BEFORE_PUBLISHING:
                    log.warning("outbox.test_crash", routing_key=entry["routing_key"])
                    os._exit(3)
                try:
                    await self.publisher.publish_raw(entry["routing_key"], entry["body"])
                except Exception as error:
                    away = outage(error)
                    if sweeping or away is None:
                        raise
                    log.warning("outbox.publish_deferred", routing_key=entry["routing_key"], error=away.message)
                    return
                await collection.update_one({"_id": doc["_id"]}, {"$unset": {f"{FIELD}.{event_id}": ""}})
            if doc.get("deleted"):
                await collection.delete_one({"_id": doc["_id"], "deleted": True})

    @staticmethod
    def _pending(doc: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
        outbox = doc.get(FIELD) or {}
        # in the order they happened
        return sorted(outbox.items(), key=lambda item: _at(item[1]))

    async def sweep(self) -> None:
        """Send what a process that died between its write and its publish left behind. Only
        events older than a sweep's interval: a younger one is being sent by its writer (this
        replica or another), and sending it too would only make a duplicate."""
        for collection in self.collections:
            await self.send(collection, {}, older_than=SWEEP_SECONDS, sweeping=True)
            # a tombstone whose events went out but which was not deleted yet (a crash between)
            async for doc in collection.find({"deleted": True}, {FIELD: 1}):
                if not doc.get(FIELD):
                    await collection.delete_one({"_id": doc["_id"], "deleted": True})

    async def sweep_forever(self, interval: float = SWEEP_SECONDS) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                log.warning("outbox.sweep_failed", exc_info=True)
            await asyncio.sleep(interval)
