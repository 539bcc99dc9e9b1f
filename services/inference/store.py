"""The inference service's MongoDB collections: `endpoints`, `workers` (heartbeats), `jobs`,
and `models`, a read model of usable checkpoints kept from the checkpoint service's events."""

from __future__ import annotations

import time
from typing import Any

from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from shared.errors import Invalid


class InferenceStore:
    def __init__(self, db: AsyncDatabase) -> None:
        self.endpoints = db["endpoints"]
        self.workers = db["workers"]
        self.jobs = db["jobs"]
        self.models = db["models"]

    async def ensure_indexes(self) -> None:
        await self.endpoints.create_index([("name", ASCENDING)], unique=True)
        await self.workers.create_index([("worker_id", ASCENDING)], unique=True)
        await self.workers.create_index([("endpoint_name", ASCENDING)])
        await self.jobs.create_index([("id", ASCENDING)], unique=True)
        await self.jobs.create_index([("created", DESCENDING)])
        await self.models.create_index([("checkpoint_id", ASCENDING)], unique=True)

    # --- endpoints ---

    async def add_endpoint(self, endpoint: dict[str, Any]) -> None:
        try:
            await self.endpoints.insert_one(endpoint)
        except DuplicateKeyError:
            raise Invalid("Cannot create already existing model") from None

    async def endpoint(self, name: str) -> dict[str, Any] | None:
        return await self.endpoints.find_one({"name": name}, {"_id": 0})

    async def all_endpoints(self) -> list[dict[str, Any]]:
        return [doc async for doc in self.endpoints.find({}, {"_id": 0}).sort("created", DESCENDING)]

    async def update_endpoint(self, name: str, **fields: Any) -> None:
        await self.endpoints.update_one({"name": name}, {"$set": fields})

    async def remove_endpoint(self, name: str) -> None:
        await self.endpoints.delete_one({"name": name})
        await self.workers.delete_many({"endpoint_name": name})

    # --- workers ---

    async def heartbeat(self, worker_id: str, endpoint_name: str, state: str, at: float) -> None:
        await self.workers.update_one(
            {"worker_id": worker_id},
            {"$set": {"endpoint_name": endpoint_name, "state": state, "last_seen": at}},
            upsert=True,
        )

    async def live_workers(self, endpoint_name: str, within: float) -> list[dict[str, Any]]:
        since = time.time() - within
        cursor = self.workers.find(
            {"endpoint_name": endpoint_name, "last_seen": {"$gte": since}, "state": {"$in": ["ready", "busy"]}}
        )
        return [doc async for doc in cursor]

    async def forget_worker(self, worker_id: str) -> None:
        await self.workers.delete_one({"worker_id": worker_id})

    # --- jobs ---

    async def add_job(self, job: dict[str, Any]) -> None:
        await self.jobs.insert_one(job)

    async def job(self, inference_id: str) -> dict[str, Any] | None:
        return await self.jobs.find_one({"id": inference_id}, {"_id": 0})

    async def update_job(self, inference_id: str, **fields: Any) -> None:
        await self.jobs.update_one({"id": inference_id}, {"$set": fields})

    async def transition_job(self, inference_id: str, expected: list[str], **fields: Any) -> bool:
        result = await self.jobs.update_one(
            {"id": inference_id, "status": {"$in": expected}}, {"$set": fields}
        )
        return result.matched_count == 1

    async def count_attempt(self, inference_id: str) -> int:
        await self.jobs.update_one({"id": inference_id}, {"$inc": {"attempts": 1}})
        job = await self.job(inference_id)
        return int(job.get("attempts", 0)) if job else 0

    async def page_jobs(
        self, *, task_type: str, owner: str | None, before: float | None, limit: int
    ) -> list[dict[str, Any]]:
        query: dict[str, Any] = {"task_type": task_type}
        if owner is not None:
            query["owner"] = owner
        if before is not None:
            query["created"] = {"$lt": before}
        cursor = self.jobs.find(query, {"_id": 0}).sort("created", DESCENDING).limit(limit + 1)
        return [doc async for doc in cursor]

    async def remove_job(self, inference_id: str) -> None:
        await self.jobs.delete_one({"id": inference_id})

    # --- the models read model ---

    async def put_model(self, checkpoint_id: str, **fields: Any) -> None:
        await self.models.update_one({"checkpoint_id": checkpoint_id}, {"$set": fields}, upsert=True)

    async def drop_model(self, checkpoint_id: str) -> None:
        await self.models.delete_one({"checkpoint_id": checkpoint_id})

    async def find_model(self, checkpoint_type: str, name: str) -> dict[str, Any] | None:
        return await self.models.find_one({"type": checkpoint_type, "names": name}, {"_id": 0})

    async def count_models(self) -> int:
        return await self.models.count_documents({})
