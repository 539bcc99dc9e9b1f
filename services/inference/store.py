"""The inference service's MongoDB collections: `endpoints`, `workers` (heartbeats), `jobs`,
and `models`, the catalog of usable checkpoints kept from the checkpoint service's events.
Documents are the records of `domain.py`, field for field."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from services.inference.domain import CatalogEntry, Endpoint, InferenceJob, Worker
from shared.contracts.workers import WorkerState
from shared.errors import Invalid
from shared.messaging import Event
from shared.outbox import LIVE, Outbox, embedded, entries, tombstone

_LIVE = [WorkerState.READY.value, WorkerState.BUSY.value]


def _doc(record: Any) -> dict[str, Any]:
    return record.model_dump(mode="json")


class InferenceStore:
    """Writes that change what others may know of an endpoint or a job take the events
    announcing it; they go out through the outbox (shared/outbox.py)."""

    def __init__(self, db: AsyncDatabase, outbox: Outbox) -> None:
        self.endpoints = db["endpoints"]
        self.workers = db["workers"]
        self.jobs = db["jobs"]
        self.models = db["models"]
        self.outbox = outbox
        outbox.watch(self.endpoints, self.jobs)

    async def ensure_indexes(self) -> None:
        await self.endpoints.create_index([("name", ASCENDING)], unique=True)
        await self.workers.create_index([("worker_id", ASCENDING)], unique=True)
        await self.workers.create_index([("endpoint_name", ASCENDING)])
        await self.jobs.create_index([("id", ASCENDING)], unique=True)
        await self.jobs.create_index([("created", DESCENDING)])
        await self.models.create_index([("checkpoint_id", ASCENDING)], unique=True)

    # --- endpoints ---

    async def add_endpoint(self, endpoint: Endpoint) -> None:
        try:
            await self.endpoints.insert_one(_doc(endpoint))
        except DuplicateKeyError:
            raise Invalid("Cannot create already existing model") from None

    async def endpoint(self, name: str) -> Endpoint | None:
        doc = await self.endpoints.find_one({"name": name, **LIVE})
        return Endpoint.model_validate(doc) if doc else None

    async def all_endpoints(self) -> list[Endpoint]:
        cursor = self.endpoints.find(LIVE).sort("created", DESCENDING)
        return [Endpoint.model_validate(doc) async for doc in cursor]

    async def update_endpoint(self, name: str, events: Sequence[Event] = (), **fields: Any) -> None:
        await self.endpoints.update_one({"name": name, **LIVE}, {"$set": {**fields, **entries(*events)}})
        if events:
            await self.outbox.send(self.endpoints, {"name": name})

    async def remove_endpoint(self, name: str, deleted: Event) -> None:
        await self.endpoints.update_one({"name": name, **LIVE}, tombstone(deleted))
        await self.workers.delete_many({"endpoint_name": name})
        await self.outbox.send(self.endpoints, {"name": name})

    # --- workers ---

    async def heartbeat(self, worker: Worker) -> None:
        await self.workers.update_one({"worker_id": worker.worker_id}, {"$set": _doc(worker)}, upsert=True)

    async def live_workers(self, endpoint_name: str, within: float) -> list[Worker]:
        cursor = self.workers.find(
            {"endpoint_name": endpoint_name, "last_seen": {"$gte": time.time() - within}, "state": {"$in": _LIVE}}
        )
        return [Worker.model_validate(doc) async for doc in cursor]

    async def forget_worker(self, worker_id: str) -> None:
        await self.workers.delete_one({"worker_id": worker_id})

    # --- jobs ---

    async def add_job(self, job: InferenceJob, events: Sequence[Event] = ()) -> None:
        await self.jobs.insert_one({**_doc(job), **(embedded(*events) if events else {})})
        if events:
            await self.outbox.send(self.jobs, {"id": job.id})

    async def job(self, inference_id: str) -> InferenceJob | None:
        doc = await self.jobs.find_one({"id": inference_id})
        return InferenceJob.model_validate(doc) if doc else None

    async def update_job(self, inference_id: str, events: Sequence[Event] = (), **fields: Any) -> None:
        await self.jobs.update_one({"id": inference_id}, {"$set": {**fields, **entries(*events)}})
        if events:
            await self.outbox.send(self.jobs, {"id": inference_id})

    async def transition_job(
        self, inference_id: str, expected: list[str], events: Sequence[Event] = (), **fields: Any
    ) -> bool:
        """Set fields (and announce it) only while the job's status is one of `expected` (a
        guard against a concurrent change); True when it was."""
        result = await self.jobs.update_one(
            {"id": inference_id, "status": {"$in": expected}}, {"$set": {**fields, **entries(*events)}}
        )
        if result.matched_count == 1 and events:
            await self.outbox.send(self.jobs, {"id": inference_id})
        return result.matched_count == 1

    async def count_attempt(self, inference_id: str) -> int:
        await self.jobs.update_one({"id": inference_id}, {"$inc": {"attempts": 1}})
        job = await self.job(inference_id)
        return job.attempts if job else 0

    async def page_jobs(
        self, *, task_type: str, owner: str | None, before: float | None, limit: int
    ) -> list[InferenceJob]:
        query: dict[str, Any] = {"task_type": task_type}
        if owner is not None:
            query["owner"] = owner
        if before is not None:
            query["created"] = {"$lt": before}
        cursor = self.jobs.find(query).sort("created", DESCENDING).limit(limit + 1)
        return [InferenceJob.model_validate(doc) async for doc in cursor]

    async def remove_job(self, inference_id: str) -> None:
        await self.jobs.delete_one({"id": inference_id})

    # --- the catalog of usable checkpoints ---

    async def put_model(self, entry: CatalogEntry) -> None:
        await self.models.update_one({"checkpoint_id": entry.checkpoint_id}, {"$set": _doc(entry)}, upsert=True)

    async def drop_model(self, checkpoint_id: str) -> None:
        await self.models.delete_one({"checkpoint_id": checkpoint_id})

    async def find_model(self, checkpoint_type: str, name: str) -> CatalogEntry | None:
        doc = await self.models.find_one({"type": checkpoint_type, "names": name})
        return CatalogEntry.model_validate(doc) if doc else None

    async def count_models(self) -> int:
        return await self.models.count_documents({})
