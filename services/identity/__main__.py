"""Starts the identity service: users, roles, permissions."""

from __future__ import annotations

from contextlib import AsyncExitStack

from faststream.rabbit import RabbitBroker

from services.identity.handlers import Identity, register
from services.identity.store import IdentityStore
from shared.contracts.identity import SERVICE
from shared.db import mongo_client
from shared.messaging import EventPublisher, Names
from shared.service import main
from shared.settings import Settings


async def setup(broker: RabbitBroker, names: Names, settings: Settings, stack: AsyncExitStack):
    client = mongo_client(settings)
    stack.push_async_callback(client.close)
    store = IdentityStore(client[settings.database_name(SERVICE)])
    identity = Identity(store, EventPublisher(broker, names), settings.admin_username)
    register(broker, names, identity)

    async def prepare() -> None:
        await store.ensure_indexes()
        await identity.bootstrap(settings.admin_password.get_secret_value())

    return prepare


if __name__ == "__main__":
    main(SERVICE, setup)
