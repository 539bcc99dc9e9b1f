"""Starts the inference service: endpoints (worker pools), inference jobs, the autoscaler."""

from __future__ import annotations

import asyncio

from services.inference import handlers
from services.inference.autoscaler import Autoscaler
from services.inference.catalog import Catalog
from services.inference.endpoints import Endpoints
from services.inference.jobs import Jobs
from services.inference.store import InferenceStore
from shared.contracts.inference import HEARTBEATS, SERVICE, queue_of
from shared.db import mongo_client
from shared.messaging import QueueDepths, declare_work_queue
from shared.pools import LocalPool
from shared.service import Runtime, main
from shared.storage import ObjectStore


async def setup(runtime: Runtime):
    settings, broker, names = runtime.settings, runtime.broker, runtime.names
    client = mongo_client(settings)
    runtime.stack.push_async_callback(client.close)
    store = InferenceStore(client[settings.database_name(SERVICE)], runtime.outbox)
    storage = await ObjectStore.open(settings, runtime.stack)
    pools = LocalPool(settings.var_dir.resolve() / "log", max_workers=settings.local_max_workers)
    runtime.stack.push_async_callback(pools.close)  # workers go when the service goes
    depths = QueueDepths(settings.amqp_url)
    runtime.stack.push_async_callback(depths.close)
    # a worker is alive while its heartbeats keep coming; three missed ones and it is gone
    live_within = 3 * settings.worker_heartbeat_seconds
    jobs = Jobs(
        store,
        storage,
        broker,
        names,
        depths,
        live_within=live_within,
        allow_private_webhooks=settings.webhook_allow_private_urls,
    )
    endpoints = Endpoints(store, pools, broker, names, live_within=live_within, fail_job=jobs.fail)
    catalog = Catalog(store)
    autoscaler = Autoscaler(
        store,
        pools,
        depths,
        names,
        live_within=live_within,
        start_timeout=settings.endpoint_start_timeout,
        scale_down_after=settings.pool_scale_down_after,
    )
    once = runtime.idempotency(client[settings.database_name(SERVICE)])
    handlers.register(runtime, endpoints, jobs, catalog, once)

    async def prepare() -> None:
        await store.ensure_indexes()
        await once.ensure_indexes()
        await storage.ensure_bucket()
        await broker.declare_queue(names.heartbeat_queue(HEARTBEATS))
        for endpoint in await store.all_endpoints():
            await declare_work_queue(broker, names, queue_of(endpoint.name))

        async def after_start() -> None:
            # the checkpoint service may start after us: fill the catalog once it answers
            for _ in range(60):
                try:
                    await catalog.backfill(runtime.client())
                    break
                except Exception:
                    await asyncio.sleep(2)
            await autoscaler.forever()

        task = asyncio.get_running_loop().create_task(after_start())
        runtime.stack.callback(task.cancel)

    return prepare


if __name__ == "__main__":
    main(SERVICE, setup)
