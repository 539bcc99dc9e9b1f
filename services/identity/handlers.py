"""Identity's subscribers: each RPC command loads what the decision needs, asks the domain,
stores the outcome and publishes what happened."""

from __future__ import annotations

import structlog
from faststream.rabbit import RabbitBroker

from services.identity import domain
from services.identity.domain import Role, User
from services.identity.passwords import hash_password
from services.identity.store import IdentityStore
from shared.contracts.identity import (
    BOOTSTRAP_ROLES,
    DEFAULT_ROLE,
    SERVICE,
    Authenticate,
    CreateRole,
    CreateUser,
    DeleteRoles,
    DeleteUsers,
    ListRoles,
    ListUsers,
    Principal,
    RoleCreated,
    RoleDeleted,
    RoleList,
    RoleUpdated,
    RoleView,
    UserCreated,
    UserDeleted,
    UserList,
    UserUpdated,
)
from shared.errors import Invalid, Unauthorized
from shared.messaging import EventPublisher, Names, register_rpc
from shared.permissions import EVERY_ALL

log = structlog.get_logger(__name__)


class Identity:
    def __init__(self, store: IdentityStore, events: EventPublisher, admin_username: str) -> None:
        self.store = store
        self.events = events
        self.admin_username = admin_username

    async def bootstrap(self, admin_password: str) -> None:
        """Idempotent first start: the two bootstrap roles and the admin user."""
        for name in BOOTSTRAP_ROLES:
            role = Role(role_name=name, permissions=list(EVERY_ALL), creator=self.admin_username)
            if await self.store.add_role_if_absent(role):
                await self.events.publish(
                    RoleCreated(role_name=name, permissions=role.permissions, creator=role.creator)
                )
        if await self.store.find_user(self.admin_username) is not None:
            return
        if not admin_password:
            raise SystemExit(
                "ESD_ADMIN_PASSWORD must be set the first time identity starts (to create the admin)"
            )
        admin = User(
            username=self.admin_username,
            roles=[DEFAULT_ROLE],
            creator=self.admin_username,
            password_hash=await hash_password(admin_password),
        )
        if await self.store.add_user_if_absent(admin):
            log.info("identity.admin_created", username=admin.username)
            await self.events.publish(
                UserCreated(username=admin.username, roles=admin.roles, creator=admin.creator)
            )

    async def authenticate(self, command: Authenticate) -> Principal:
        user = await self.store.find_user(command.username)
        if user is None:
            raise Unauthorized("Unauthorized")
        return domain.principal_of(user, await self.store.find_roles(user.roles))

    async def create_user(self, command: CreateUser) -> None:
        if command.initial:
            await self._create_initial_user(command)
            return
        actor = self._actor(command.actor)
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
        if await self.store.save_user(user):
            log.info("user.created", username=user.username, actor=actor.username)
            await self.events.publish(
                UserCreated(username=user.username, roles=user.roles, creator=user.creator)
            )
        else:
            log.info("user.updated", username=user.username, actor=actor.username)
            await self.events.publish(UserUpdated(username=user.username, roles=user.roles))

    async def _create_initial_user(self, command: CreateUser) -> None:
        # A client's first-run bootstrap: create with the default role, never change a user.
        creator = command.actor.username if command.actor else command.username
        user = User(
            username=command.username,
            roles=[DEFAULT_ROLE],
            creator=creator,
            password_hash=await hash_password(command.password),
        )
        if await self.store.add_user_if_absent(user):
            log.info("user.created", username=user.username, initial=True)
            await self.events.publish(
                UserCreated(username=user.username, roles=user.roles, creator=user.creator)
            )

    async def list_users(self, command: ListUsers) -> UserList:
        users = domain.visible_users(command.actor, await self.store.find_users(command.username))
        roles = await self.store.find_roles()
        return UserList(users=[domain.user_view(user, roles) for user in users])

    async def delete_users(self, command: DeleteUsers) -> None:
        domain.check_user_deletion(command.actor, command.user_name_list)
        for username in await self.store.delete_users(command.user_name_list):
            log.info("user.deleted", username=username, actor=command.actor.username)
            await self.events.publish(UserDeleted(username=username))

    async def create_role(self, command: CreateRole) -> RoleView:
        domain.check_permission_names(command.permissions)
        permissions = list(dict.fromkeys(command.permissions))
        if command.initial:
            creator = command.actor.username if command.actor else self.admin_username
            role = Role(role_name=command.role_name, permissions=permissions, creator=creator)
            if await self.store.add_role_if_absent(role):
                await self._role_created(role)
            return domain.role_view((await self.store.find_roles([role.role_name]))[role.role_name])
        actor = self._actor(command.actor)
        domain.check_grant(actor, permissions)
        existing = (await self.store.find_roles([command.role_name])).get(command.role_name)
        domain.check_role_change(actor, existing)
        role = Role(role_name=command.role_name, permissions=permissions, creator=actor.username)
        if await self.store.save_role(role):
            await self._role_created(role)
        else:
            log.info("role.updated", role_name=role.role_name, actor=actor.username)
            await self.events.publish(RoleUpdated(role_name=role.role_name, permissions=permissions))
        return domain.role_view((await self.store.find_roles([role.role_name]))[role.role_name])

    async def _role_created(self, role: Role) -> None:
        log.info("role.created", role_name=role.role_name, creator=role.creator)
        await self.events.publish(
            RoleCreated(role_name=role.role_name, permissions=role.permissions, creator=role.creator)
        )

    async def list_roles(self, command: ListRoles) -> RoleList:
        roles = await self.store.find_roles([command.role] if command.role is not None else None)
        return RoleList(roles=[domain.role_view(role) for role in roles.values()])

    async def delete_roles(self, command: DeleteRoles) -> None:
        domain.check_role_deletion(command.role_name_list)
        for role_name in await self.store.delete_roles(command.role_name_list):
            log.info("role.deleted", role_name=role_name, actor=command.actor.username)
            await self.events.publish(RoleDeleted(role_name=role_name))

    @staticmethod
    def _actor(actor: Principal | None) -> Principal:
        if actor is None:  # the gateway always sends one; a missing one is a caller's bug
            raise Invalid("the acting user is missing")
        return actor


def register(broker: RabbitBroker, names: Names, identity: Identity) -> None:
    register_rpc(
        broker,
        names,
        SERVICE,
        {
            "authenticate": identity.authenticate,
            "create_user": identity.create_user,
            "list_users": identity.list_users,
            "delete_users": identity.delete_users,
            "create_role": identity.create_role,
            "list_roles": identity.list_roles,
            "delete_roles": identity.delete_roles,
        },
    )
