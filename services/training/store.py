"""The training service's MongoDB collections: `datasets` (unique by name) and `trainings`.
Documents are the records of `domain.py`, field for field."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from services.training.domain import Dataset, TrainingJob
from shared.errors import Invalid
from shared.messaging import Event
from shared.outbox import Outbox, embedded, entries


class TrainingStore:
    """Writes that change what others may know of a training take the events announcing it;
    they go out through the outbox (shared/outbox.py)."""

    def __init__(self, db: AsyncDatabase, outbox: Outbox) -> None:
        self.datasets = db["datasets"]
        self.trainings = db["trainings"]
        self.outbox = outbox
        outbox.watch(self.trainings)

    async def ensure_indexes(self) -> None:
        await self.datasets.create_index([("name", ASCENDING)], unique=True)
        await self.trainings.create_index([("id", ASCENDING)], unique=True)
        await self.trainings.create_index([("created", DESCENDING)])

    # --- datasets ---

    async def add_dataset(self, dataset: Dataset) -> None:
        try:
            await self.datasets.insert_one(dataset.model_dump(mode="json"))
        except DuplicateKeyError:
            raise Invalid(f"dataset {dataset.name} already exists") from None

    async def dataset(self, name: str) -> Dataset | None:
        doc = await self.datasets.find_one({"name": name})
        return Dataset.model_validate(doc) if doc else None

    async def all_datasets(self) -> list[Dataset]:
        return [Dataset.model_validate(doc) async for doc in self.datasets.find({}).sort("created", DESCENDING)]

    async def update_dataset(self, name: str, **fields: Any) -> None:
        await self.datasets.update_one({"name": name}, {"$set": fields})

    async def remove_dataset(self, name: str) -> None:
        await self.datasets.delete_one({"name": name})

    # --- trainings ---

    async def add_training(self, training: TrainingJob, events: Sequence[Event] = ()) -> None:
        await self.trainings.insert_one({**training.model_dump(mode="json"), **(embedded(*events) if events else {})})
        if events:
            await self.outbox.send(self.trainings, {"id": training.id})

    async def training(self, training_id: str) -> TrainingJob | None:
        doc = await self.trainings.find_one({"id": training_id})
        return TrainingJob.model_validate(doc) if doc else None

    async def update_training(self, training_id: str, events: Sequence[Event] = (), **fields: Any) -> None:
        await self.trainings.update_one({"id": training_id}, {"$set": {**fields, **entries(*events)}})
        if events:
            await self.outbox.send(self.trainings, {"id": training_id})

    async def transition(
        self, training_id: str, expected: list[str], events: Sequence[Event] = (), **fields: Any
    ) -> bool:
        """Set fields (and announce it) only while the status is one of `expected`; True when
        it was."""
        result = await self.trainings.update_one(
            {"id": training_id, "status": {"$in": expected}}, {"$set": {**fields, **entries(*events)}}
        )
        if result.matched_count == 1 and events:
            await self.outbox.send(self.trainings, {"id": training_id})
        return result.matched_count == 1

    async def count_attempt(self, training_id: str) -> int:
        await self.trainings.update_one({"id": training_id}, {"$inc": {"attempts": 1}})
        training = await self.training(training_id)
        return training.attempts if training else 0

    async def page(self, *, owner: str | None, before: float | None, limit: int) -> list[TrainingJob]:
        query: dict[str, Any] = {}
        if owner is not None:
            query["owner"] = owner
        if before is not None:
            query["created"] = {"$lt": before}
        cursor = self.trainings.find(query).sort("created", DESCENDING).limit(limit + 1)
        return [TrainingJob.model_validate(doc) async for doc in cursor]

    async def remove_training(self, training_id: str) -> None:
        await self.trainings.delete_one({"id": training_id})
