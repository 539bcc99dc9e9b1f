"""Starts the checkpoint service: model files in object storage, uploaded or downloaded."""

from __future__ import annotations

from services.checkpoint import handlers
from services.checkpoint.checkpoints import Checkpoints
from services.checkpoint.downloads import Downloader
from services.checkpoint.store import CheckpointStore
from shared.contracts.checkpoint import DOWNLOADS, RENAMES, SERVICE
from shared.db import mongo_client
from shared.messaging import declare_work_queue
from shared.service import Runtime, main
from shared.storage import ObjectStore


async def setup(runtime: Runtime):
    settings = runtime.settings
    client = mongo_client(settings)
    runtime.stack.push_async_callback(client.close)
    store = CheckpointStore(client[settings.database_name(SERVICE)], runtime.outbox)
    storage = await ObjectStore.open(settings, runtime.stack)
    downloader = Downloader(
        storage,
        allow_private=settings.checkpoint_allow_private_urls,
        part_bytes=settings.checkpoint_download_part_mb * 1024 * 1024,
        timeout=settings.checkpoint_download_timeout,
        max_bytes=settings.checkpoint_max_bytes,
    )
    checkpoints = Checkpoints(store, storage, downloader, runtime.broker, runtime.names)
    once = runtime.idempotency(client[settings.database_name(SERVICE)])
    handlers.register(runtime, checkpoints, once)

    async def prepare() -> None:
        await store.ensure_indexes()
        await once.ensure_indexes()
        await storage.ensure_bucket()
        for queue in (DOWNLOADS, RENAMES):
            await declare_work_queue(runtime.broker, runtime.names, queue)

    return prepare


if __name__ == "__main__":
    main(SERVICE, setup)
