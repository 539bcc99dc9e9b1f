"""Starts the identity service: users, roles, permissions."""

from __future__ import annotations

from services.identity import handlers
from services.identity.domain import SignInLimit
from services.identity.roles import Roles
from services.identity.store import IdentityStore
from services.identity.tokens import Tokens
from services.identity.users import Users
from shared.contracts.identity import SERVICE
from shared.db import mongo_client
from shared.service import Runtime, main


async def setup(runtime: Runtime):
    settings = runtime.settings
    client = mongo_client(settings)
    runtime.stack.push_async_callback(client.close)
    store = IdentityStore(client[settings.database_name(SERVICE)], runtime.outbox)
    users = Users(store, settings.admin_username)
    roles = Roles(store, settings.admin_username)
    tokens = Tokens(
        store,
        key=settings.token_key.get_secret_value().encode(),
        ttl=settings.token_ttl,
        limit=SignInLimit(
            per_user=settings.sign_in_failures_per_user,
            per_address=settings.sign_in_failures_per_address,
            window=settings.sign_in_window,
        ),
    )
    once = runtime.idempotency(client[settings.database_name(SERVICE)])
    handlers.register(runtime, users, roles, tokens, store, once)

    async def prepare() -> None:
        await store.ensure_indexes()
        await once.ensure_indexes()
        await roles.bootstrap()
        await users.bootstrap(settings.admin_password.get_secret_value())

    return prepare


if __name__ == "__main__":
    main(SERVICE, setup)
