"""Starts the webhooks service: the jobs' events, signed, to the URLs the jobs name."""

from __future__ import annotations

import asyncio

from services.webhooks import handlers
from services.webhooks.deliveries import Deliveries
from services.webhooks.store import WebhookStore
from shared.contracts.webhooks import DELIVERIES, SERVICE
from shared.db import mongo_client
from shared.messaging import declare_work_queue
from shared.service import Runtime, main


async def setup(runtime: Runtime):
    settings = runtime.settings
    secret = settings.webhook_secret.get_secret_value()
    if not secret:
        raise SystemExit("ESD_WEBHOOK_SECRET must be set: webhooks are signed with it (whsec_<base64>)")
    client = mongo_client(settings)
    runtime.stack.push_async_callback(client.close)
    store = WebhookStore(client[settings.database_name(SERVICE)])
    deliveries = Deliveries(
        store,
        runtime.broker,
        runtime.names,
        secret=secret,
        timeout=settings.webhook_timeout,
        retry_for=settings.webhook_retry_for,
        allow_private=settings.webhook_allow_private_urls,
    )
    handlers.register(runtime, deliveries)

    async def prepare() -> None:
        await store.ensure_indexes()
        await declare_work_queue(runtime.broker, runtime.names, DELIVERIES)
        sending = asyncio.get_running_loop().create_task(deliveries.send_forever())
        runtime.stack.callback(sending.cancel)

    return prepare


if __name__ == "__main__":
    main(SERVICE, setup)
