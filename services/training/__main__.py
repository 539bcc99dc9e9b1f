"""Starts the training service: datasets and LoRA training jobs, and its training workers."""

from __future__ import annotations

import asyncio

from services.training import handlers
from services.training.datasets import Datasets
from services.training.store import TrainingStore
from services.training.trainings import Trainings
from shared.contracts.training import HEARTBEATS, JOBS, POOL, SERVICE
from shared.db import mongo_client
from shared.messaging import declare_work_queue
from shared.pools import LocalPool, PoolBackend
from shared.service import Runtime, main
from shared.storage import ObjectStore


async def keep_workers(pool: PoolBackend, count: int, interval: float = 2.0) -> None:
    """The training pool stays at its size: a worker that died is replaced."""
    while True:
        await pool.scale(POOL, count)
        await asyncio.sleep(interval)


async def setup(runtime: Runtime):
    settings, broker, names = runtime.settings, runtime.broker, runtime.names
    client = mongo_client(settings)
    runtime.stack.push_async_callback(client.close)
    store = TrainingStore(client[settings.database_name(SERVICE)], runtime.outbox)
    storage = await ObjectStore.open(settings, runtime.stack)
    pool = LocalPool(settings.var_dir.resolve() / "log", module="services.training.worker", stop_timeout=30)
    runtime.stack.push_async_callback(pool.close)  # workers go when the service goes
    datasets = Datasets(store, storage)
    trainings = Trainings(
        store, storage, broker, names, runtime.client(), allow_private_webhooks=settings.webhook_allow_private_urls
    )
    once = runtime.idempotency(client[settings.database_name(SERVICE)])
    handlers.register(runtime, datasets, trainings, once)

    async def prepare() -> None:
        await store.ensure_indexes()
        await once.ensure_indexes()
        await storage.ensure_bucket()
        await declare_work_queue(broker, names, JOBS)
        await broker.declare_queue(names.heartbeat_queue(HEARTBEATS))
        task = asyncio.get_running_loop().create_task(keep_workers(pool, settings.training_workers))
        runtime.stack.callback(task.cancel)

    return prepare


if __name__ == "__main__":
    main(SERVICE, setup)
