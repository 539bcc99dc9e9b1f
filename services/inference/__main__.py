"""Starts the inference service: endpoints (worker pools) and inference jobs."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

from faststream.rabbit import RabbitBroker

from services.inference.handlers import Inference, register
from shared.pools import LocalPool
from services.inference.store import InferenceStore
from shared.contracts.inference import HEARTBEATS, SERVICE
from shared.db import mongo_client
from shared.messaging import EventPublisher, Names, QueueDepths, RpcClient, declare_work_queue
from shared.service import main
from shared.settings import Settings
from shared.storage import ObjectStore


async def setup(broker: RabbitBroker, names: Names, settings: Settings, stack: AsyncExitStack):
    client = mongo_client(settings)
    stack.push_async_callback(client.close)
    store = InferenceStore(client[settings.database_name(SERVICE)])
    storage = await ObjectStore.open(settings, stack)
    pools = LocalPool(settings.var_dir.resolve() / "log")
    stack.push_async_callback(pools.close)  # workers go when the service goes
    depths = QueueDepths(settings.amqp_url)
    stack.push_async_callback(depths.close)
    inference = Inference(
        store, storage, pools, EventPublisher(broker, names), broker, names, depths,
        start_timeout=settings.endpoint_start_timeout,
        scale_down_after=settings.pool_scale_down_after,
    )
    register(broker, names, inference)

    async def prepare() -> None:
        await store.ensure_indexes()
        await storage.ensure_bucket()
        await declare_work_queue(broker, names, HEARTBEATS)
        for endpoint in await store.all_endpoints():
            await declare_work_queue(broker, names, f"inference.{endpoint['name']}")

        async def after_start() -> None:
            # the checkpoint service may start after us: learn its models once it answers
            rpc = RpcClient(broker, names, timeout=5)
            for _ in range(60):
                try:
                    await inference.backfill_models(rpc)
                    break
                except Exception:
                    await asyncio.sleep(2)
            await inference.autoscale_forever()

        task = asyncio.get_running_loop().create_task(after_start())
        stack.callback(task.cancel)

    return prepare


if __name__ == "__main__":
    main(SERVICE, setup)
