"""The checkpoint service's MongoDB collections: `checkpoints`, and `names`, which reserves
each file name for one checkpoint (file names are unique across all checkpoints; a unique
index on a plain field works on every MongoDB, where one over an array may not)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from services.checkpoint.domain import Checkpoint, duplicate_name_error
from shared.contracts.checkpoint import CheckpointStatus, CheckpointType
from shared.messaging import Event
from shared.outbox import LIVE, Outbox, embedded, entries, tombstone

_FIELDS = (
    "id",
    "type",
    "status",
    "names",
    "bucket",
    "params",
    "allowed_roles",
    "created",
    "urls",
    "error",
    "progress",
    "attempts",
)


def _checkpoint(doc: dict) -> Checkpoint:
    values = {name: doc[name] for name in _FIELDS if name in doc}
    values["type"] = CheckpointType(values["type"])
    values["status"] = CheckpointStatus(values["status"])
    return Checkpoint(**values)


def _doc(checkpoint: Checkpoint) -> dict:
    doc = {name: getattr(checkpoint, name) for name in _FIELDS}
    doc["type"] = checkpoint.type.value
    doc["status"] = checkpoint.status.value
    return doc


class CheckpointStore:
    """Writes that change what others may know of a checkpoint take the events announcing it;
    they go out through the outbox (shared/outbox.py)."""

    def __init__(self, db: AsyncDatabase, outbox: Outbox) -> None:
        self.checkpoints = db["checkpoints"]
        self.names = db["names"]
        self.outbox = outbox
        outbox.watch(self.checkpoints)

    async def ensure_indexes(self) -> None:
        await self.checkpoints.create_index([("id", ASCENDING)], unique=True)
        await self.checkpoints.create_index([("created", DESCENDING)])
        await self.names.create_index([("name", ASCENDING)], unique=True)

    # --- names ---

    async def reserve_names(self, names: list[str], checkpoint_id: str) -> None:
        """Reserve every name for the checkpoint, or none (400 on the first taken one)."""
        taken: list[str] = []
        for name in names:
            try:
                await self.names.insert_one({"name": name, "checkpoint_id": checkpoint_id})
            except DuplicateKeyError:
                holder = await self.names.find_one({"name": name})
                if holder is not None and holder.get("checkpoint_id") == checkpoint_id:
                    continue  # a redelivered command reserving again
                await self.release_names(taken, checkpoint_id)
                raise duplicate_name_error(name) from None
            taken.append(name)

    async def holder(self, name: str) -> str | None:
        """The id of the checkpoint holding a file name."""
        doc = await self.names.find_one({"name": name})
        return doc["checkpoint_id"] if doc else None

    async def release_names(self, names: list[str], checkpoint_id: str) -> None:
        if names:
            await self.names.delete_many({"name": {"$in": names}, "checkpoint_id": checkpoint_id})

    # --- checkpoints ---

    async def insert(self, checkpoint: Checkpoint, events: Sequence[Event] = ()) -> None:
        await self.checkpoints.insert_one({**_doc(checkpoint), **(embedded(*events) if events else {})})
        if events:
            await self.outbox.send(self.checkpoints, {"id": checkpoint.id})

    async def get(self, checkpoint_id: str) -> Checkpoint | None:
        doc = await self.checkpoints.find_one({"id": checkpoint_id, **LIVE})
        return _checkpoint(doc) if doc else None

    async def update(self, checkpoint_id: str, events: Sequence[Event] = (), **fields: Any) -> None:
        await self.checkpoints.update_one(
            {"id": checkpoint_id, **LIVE}, {"$set": {**self._values(fields), **entries(*events)}}
        )
        if events:
            await self.outbox.send(self.checkpoints, {"id": checkpoint_id})

    async def transition(
        self, checkpoint_id: str, expected: list[CheckpointStatus], events: Sequence[Event] = (), **fields: Any
    ) -> bool:
        """Set fields (and announce it) only if the status is still one of `expected` (a guard
        against a concurrent change); True when it was."""
        result = await self.checkpoints.update_one(
            {"id": checkpoint_id, "status": {"$in": [status.value for status in expected]}, **LIVE},
            {"$set": {**self._values(fields), **entries(*events)}},
        )
        if result.matched_count == 1 and events:
            await self.outbox.send(self.checkpoints, {"id": checkpoint_id})
        return result.matched_count == 1

    async def count_attempt(self, checkpoint_id: str) -> None:
        await self.checkpoints.update_one({"id": checkpoint_id}, {"$inc": {"attempts": 1}})

    async def page(
        self,
        *,
        types: list[CheckpointType],
        statuses: list[CheckpointStatus],
        owners: list[list[str]],
        skip: int,
        limit: int,
    ) -> tuple[int, list[Checkpoint]]:
        query: dict[str, Any] = dict(LIVE)
        if types:
            query["type"] = {"$in": [value.value for value in types]}
        if statuses:
            query["status"] = {"$in": [value.value for value in statuses]}
        if owners:  # a checkpoint matches one owner of each list
            query["$and"] = [{"allowed_roles": {"$in": names}} for names in owners]
        total = await self.checkpoints.count_documents(query)
        cursor = self.checkpoints.find(query).sort("created", DESCENDING).skip(skip).limit(limit)
        return total, [_checkpoint(doc) async for doc in cursor]

    async def delete(self, checkpoint_id: str, deleted: Event) -> None:
        await self.checkpoints.update_one({"id": checkpoint_id, **LIVE}, tombstone(deleted))
        await self.outbox.send(self.checkpoints, {"id": checkpoint_id})

    @staticmethod
    def _values(fields: dict[str, Any]) -> dict[str, Any]:
        return {name: value.value if isinstance(value, CheckpointStatus) else value for name, value in fields.items()}
