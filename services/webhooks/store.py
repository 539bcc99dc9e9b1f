"""The webhooks service's MongoDB collections: `subscriptions` (a job's webhook) and
`deliveries` (one per event and webhook, with its attempts). Documents are the records of
`domain.py`, field for field."""

from __future__ import annotations

import time
from typing import Any

from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from services.webhooks.domain import Delivery, Subscription


class WebhookStore:
    def __init__(self, db: AsyncDatabase) -> None:
        self.subscriptions = db["subscriptions"]
        self.deliveries = db["deliveries"]

    async def ensure_indexes(self) -> None:
        await self.subscriptions.create_index([("job_id", ASCENDING)], unique=True)
        await self.deliveries.create_index([("id", ASCENDING)], unique=True)
        await self.deliveries.create_index([("status", ASCENDING), ("next_at", ASCENDING)])

    async def subscribe(self, subscription: Subscription) -> None:
        try:
            await self.subscriptions.insert_one(subscription.model_dump(mode="json"))
        except DuplicateKeyError:
            pass  # a repeated event

    async def subscription(self, job_id: str) -> Subscription | None:
        doc = await self.subscriptions.find_one({"job_id": job_id})
        return Subscription.model_validate(doc) if doc else None

    async def progress_sent(self, job_id: str, at: float) -> None:
        await self.subscriptions.update_one({"job_id": job_id}, {"$set": {"last_progress": at}})

    async def add_delivery(self, delivery: Delivery) -> bool:
        """False when this event was delivered (or queued) already."""
        try:
            await self.deliveries.insert_one(delivery.model_dump(mode="json"))
        except DuplicateKeyError:
            return False
        return True

    async def claim(self, lease: float) -> Delivery | None:
        """The next delivery that is due, kept from other senders for `lease` seconds (a sender
        that dies lets it come due again)."""
        now = time.time()
        doc = await self.deliveries.find_one_and_update(
            {"status": "pending", "next_at": {"$lte": now}},
            {"$set": {"next_at": now + lease}, "$inc": {"attempts": 1}},
            sort=[("next_at", ASCENDING)],
            return_document=ReturnDocument.AFTER,
        )
        return Delivery.model_validate(doc) if doc else None

    async def update(self, delivery_id: str, **fields: Any) -> None:
        await self.deliveries.update_one({"id": delivery_id}, {"$set": fields})
