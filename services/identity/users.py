"""Users: who exists, with which roles, and who the caller of a request is. Each use case loads
what the decision needs, asks the domain, stores the outcome and publishes what happened."""

from __future__ import annotations

import structlog

from services.identity import domain
from services.identity.domain import User
from services.identity.passwords import hash_password
from services.identity.store import IdentityStore
from shared.contracts.identity import (
    DEFAULT_ROLE,
    AuthenticateUser,
    CreateUser,
    DeleteUsers,
    ListUsers,
    Principal,
    TokenRevoked,
    UserCreated,
    UserDeleted,
    UserList,
    UserUpdated,
)
from shared.errors import Unauthorized

log = structlog.get_logger(__name__)


class Users:
    def __init__(self, store: IdentityStore, admin_username: str) -> None:
        self.store = store
        self.admin_username = admin_username

    async def bootstrap(self, admin_password: str) -> None:
        """Idempotent first start: the admin user, with the default role."""
        if await self.store.find_user(self.admin_username) is not None:
            return
        if not admin_password:
            raise SystemExit("ESD_ADMIN_PASSWORD must be set the first time identity starts (to create the admin)")
        admin = User(
            username=self.admin_username,
            roles=[DEFAULT_ROLE],
            creator=self.admin_username,
            password_hash=await hash_password(admin_password),
        )
        if await self.store.add_user_if_absent(admin, self._created(admin)):
            log.info("identity.admin_created", username=admin.username)

    async def authenticate(self, command: AuthenticateUser) -> Principal:
        user = await self.store.find_user(command.username)
        if user is None:
            raise Unauthorized("Unauthorized")
        return domain.principal_of(user, await self.store.find_roles(user.roles))

    async def create(self, command: CreateUser) -> None:
        if command.initial:
            await self._create_initial(command)
            return
        actor = domain.acting(command.actor)
        roles = await self.store.find_roles(command.roles)
        domain.check_roles_exist(command.roles, roles)
        domain.check_grant(actor, domain.permissions_of(command.roles, roles))
        domain.check_user_change(actor, await self.store.find_user(command.username))
        user = User(
            username=command.username,
            roles=list(dict.fromkeys(command.roles)),
            creator=actor.username,
            password_hash=await hash_password(command.password),
        )
        created = await self.store.save_user(
            user, created=self._created(user), updated=UserUpdated(username=user.username, roles=user.roles)
        )
        if not created:  # a new password ends the sessions the old one opened
            await self.store.revoke_tokens({"username": user.username}, TokenRevoked(username=user.username))
        log.info("user.created" if created else "user.updated", username=user.username, actor=actor.username)

    async def _create_initial(self, command: CreateUser) -> None:
        # A client's first-run bootstrap: create with the default role, never change a user.
        creator = command.actor.username if command.actor else command.username
        user = User(
            username=command.username,
            roles=[DEFAULT_ROLE],
            creator=creator,
            password_hash=await hash_password(command.password),
        )
        if await self.store.add_user_if_absent(user, self._created(user)):
            log.info("user.created", username=user.username, initial=True)

    @staticmethod
    def _created(user: User) -> UserCreated:
        return UserCreated(username=user.username, roles=user.roles, creator=user.creator)

    async def list(self, command: ListUsers) -> UserList:
        users = domain.visible_users(command.actor, await self.store.find_users(command.username))
        roles = await self.store.find_roles()
        return UserList(users=[domain.user_view(user, roles) for user in users])

    async def delete(self, command: DeleteUsers) -> None:
        domain.check_user_deletion(command.actor, command.user_name_list)
        for username in await self.store.delete_users(command.user_name_list, lambda name: UserDeleted(username=name)):
            await self.store.revoke_tokens({"username": username}, TokenRevoked(username=username))
            log.info("user.deleted", username=username, actor=command.actor.username)
