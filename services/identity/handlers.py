"""Where identity's requests enter: each command is handed to the use case that answers it."""

from __future__ import annotations

from services.identity.roles import Roles
from services.identity.store import IdentityStore
from services.identity.tokens import Tokens
from services.identity.users import Users
from shared.contracts import identity as contract
from shared.idempotency import Idempotency
from shared.messaging import Event
from shared.service import Runtime


def register(
    runtime: Runtime, users: Users, roles: Roles, tokens: Tokens, store: IdentityStore, once: Idempotency
) -> None:
    runtime.rpc.register_all(
        {
            contract.AUTHENTICATE_USER: users.authenticate,
            contract.CREATE_USER: once.wrap(contract.CREATE_USER, users.create),
            contract.LIST_USERS: users.list,
            contract.DELETE_USERS: users.delete,
            contract.CREATE_ROLE: once.wrap(contract.CREATE_ROLE, roles.create),
            contract.LIST_ROLES: roles.list,
            contract.DELETE_ROLES: roles.delete,
            contract.ISSUE_TOKEN: tokens.issue,
            contract.AUTHENTICATE_TOKEN: tokens.authenticate,
            contract.REVOKE_TOKENS: tokens.revoke,
        }
    )

    # Every replica keeps users and roles in memory: a change made by another one empties them
    # here (a role's deletion takes it from its users too).
    @runtime.broker.subscriber(runtime.names.replica_queue(contract.SERVICE, "role.*"), runtime.names.events)
    async def role_changed(_: Event) -> None:
        store.forget_roles()
        store.forget_users()

    @runtime.broker.subscriber(runtime.names.replica_queue(contract.SERVICE, "user.*"), runtime.names.events)
    async def user_changed(_: Event) -> None:
        store.forget_users()
