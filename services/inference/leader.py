"""Which replica of the inference service runs the autoscaler: the one holding a lease, a
MongoDB document `{_id: <name>, holder, expires}`.

A replica takes the lease when it is free or lapsed, and keeps it by renewing it well before it
lapses; a replica that dies stops renewing, and another takes over once `seconds` have passed
(a replica that stops cleanly gives the lease back at once). Taking and renewing are one atomic
`find_one_and_update`; two replicas racing to insert the first document meet the unique `_id`,
and one of them loses. Expiry uses the replicas' clocks: keep them in sync (NTP), as a skew
adds to the takeover time."""

from __future__ import annotations

import time

import structlog
from pymongo import ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

log = structlog.get_logger(__name__)


class Lease:
    def __init__(self, collection: AsyncCollection, name: str, holder: str, seconds: float) -> None:
        self.collection = collection
        self.name = name
        self.holder = holder
        self.seconds = seconds
        self.held = False

    async def hold(self) -> bool:
        """Take or renew the lease; True while this replica holds it."""
        now = time.time()
        try:
            document = await self.collection.find_one_and_update(
                {"_id": self.name, "$or": [{"holder": self.holder}, {"expires": {"$lt": now}}]},
                {"$set": {"holder": self.holder, "expires": now + self.seconds}},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
            held = document is not None and document.get("holder") == self.holder
        except DuplicateKeyError:  # another replica holds it (the filter missed, the insert clashed)
            held = False
        if held != self.held:
            log.info("leader.acquired" if held else "leader.lost", lease=self.name, holder=self.holder)
        self.held = held
        return held

    async def release(self) -> None:
        """Give the lease back (on a clean stop), so that another replica takes over at once."""
        if self.held:
            await self.collection.delete_one({"_id": self.name, "holder": self.holder})
            self.held = False
            log.info("leader.released", lease=self.name, holder=self.holder)
