"""Roles: what each role may do. Each use case loads what the decision needs, asks the domain,
stores the outcome and publishes what happened."""

from __future__ import annotations

import structlog

from services.identity import domain
from services.identity.domain import Role
from services.identity.store import IdentityStore
from shared.contracts.identity import (
    BOOTSTRAP_ROLES,
    CreateRole,
    DeleteRoles,
    ListRoles,
    RoleCreated,
    RoleDeleted,
    RoleList,
    RoleUpdated,
    RoleView,
)
from shared.permissions import EVERY_ALL

log = structlog.get_logger(__name__)


class Roles:
    def __init__(self, store: IdentityStore, admin_username: str) -> None:
        self.store = store
        self.admin_username = admin_username

    async def bootstrap(self) -> None:
        """Idempotent first start: the bootstrap roles, each holding every `:all` permission."""
        for name in BOOTSTRAP_ROLES:
            role = Role(role_name=name, permissions=list(EVERY_ALL), creator=self.admin_username)
            await self.store.add_role_if_absent(role, self._created(role))

    async def create(self, command: CreateRole) -> RoleView:
        domain.check_permission_names(command.permissions)
        permissions = list(dict.fromkeys(command.permissions))
        if command.initial:
            creator = command.actor.username if command.actor else self.admin_username
            role = Role(role_name=command.role_name, permissions=permissions, creator=creator)
            if await self.store.add_role_if_absent(role, self._created(role)):
                log.info("role.created", role_name=role.role_name, creator=role.creator)
            return domain.role_view((await self.store.find_roles([role.role_name]))[role.role_name])
        actor = domain.acting(command.actor)
        domain.check_grant(actor, permissions)
        existing = (await self.store.find_roles([command.role_name])).get(command.role_name)
        domain.check_role_change(actor, existing)
        role = Role(role_name=command.role_name, permissions=permissions, creator=actor.username)
        created = await self.store.save_role(
            role, created=self._created(role), updated=RoleUpdated(role_name=role.role_name, permissions=permissions)
        )
        log.info("role.created" if created else "role.updated", role_name=role.role_name, actor=actor.username)
        return domain.role_view((await self.store.find_roles([role.role_name]))[role.role_name])

    @staticmethod
    def _created(role: Role) -> RoleCreated:
        return RoleCreated(role_name=role.role_name, permissions=role.permissions, creator=role.creator)

    async def list(self, command: ListRoles) -> RoleList:
        roles = await self.store.find_roles([command.role] if command.role is not None else None)
        return RoleList(roles=[domain.role_view(role) for role in roles.values()])

    async def delete(self, command: DeleteRoles) -> None:
        domain.check_role_deletion(command.role_name_list)
        for role_name in await self.store.delete_roles(
            command.role_name_list, lambda name: RoleDeleted(role_name=name)
        ):
            log.info("role.deleted", role_name=role_name, actor=command.actor.username)
