"""Starts the checkpoint service: model files in object storage, uploaded or downloaded."""

from __future__ import annotations

from contextlib import AsyncExitStack

from faststream.rabbit import RabbitBroker

from services.checkpoint.downloads import Downloader
from services.checkpoint.handlers import Checkpoints, register
from services.checkpoint.store import CheckpointStore
from shared.contracts.checkpoint import DOWNLOADS, RENAMES, SERVICE
from shared.db import mongo_client
from shared.messaging import EventPublisher, Names, declare_work_queue
from shared.service import main
from shared.settings import Settings
from shared.storage import ObjectStore


async def setup(broker: RabbitBroker, names: Names, settings: Settings, stack: AsyncExitStack):
    client = mongo_client(settings)
    stack.push_async_callback(client.close)
    store = CheckpointStore(client[settings.database_name(SERVICE)])
    storage = await ObjectStore.open(settings, stack)
    downloader = Downloader(
        storage,
        allow_private=settings.checkpoint_allow_private_urls,
        part_bytes=settings.checkpoint_download_part_mb * 1024 * 1024,
        timeout=settings.checkpoint_download_timeout,
    )
    checkpoints = Checkpoints(store, storage, downloader, EventPublisher(broker, names), broker, names)
    register(broker, names, checkpoints)

    async def prepare() -> None:
        await store.ensure_indexes()
        await storage.ensure_bucket()
        for queue in (DOWNLOADS, RENAMES):
            await declare_work_queue(broker, names, queue)

    return prepare


if __name__ == "__main__":
    main(SERVICE, setup)
