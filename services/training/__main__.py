"""Starts the training service: datasets and LoRA training jobs, and its training workers."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

from faststream.rabbit import RabbitBroker

from services.training.handlers import Training, keep_workers, register
from services.training.store import TrainingStore
from shared.contracts.training import JOBS, SERVICE
from shared.db import mongo_client
from shared.messaging import EventPublisher, Names, RpcClient, declare_work_queue
from shared.pools import LocalPool
from shared.service import main
from shared.settings import Settings
from shared.storage import ObjectStore


async def setup(broker: RabbitBroker, names: Names, settings: Settings, stack: AsyncExitStack):
    client = mongo_client(settings)
    stack.push_async_callback(client.close)
    store = TrainingStore(client[settings.database_name(SERVICE)])
    storage = await ObjectStore.open(settings, stack)
    pool = LocalPool(settings.var_dir.resolve() / "log", module="services.training.worker", stop_timeout=30)
    stack.push_async_callback(pool.close)  # workers go when the service goes
    training = Training(store, storage, EventPublisher(broker, names), broker, names, RpcClient(broker, names, settings.rpc_timeout))
    register(broker, names, training)

    async def prepare() -> None:
        await store.ensure_indexes()
        await storage.ensure_bucket()
        await declare_work_queue(broker, names, JOBS)
        task = asyncio.get_running_loop().create_task(keep_workers(pool, settings.training_workers))
        stack.callback(task.cancel)

    return prepare


if __name__ == "__main__":
    main(SERVICE, setup)
