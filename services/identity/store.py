"""Identity's MongoDB collections: `users` and `roles`, each unique by name.

Roles are few and read by nearly every request (a principal is a user's roles' permissions),
so this store keeps them all in memory: forgotten on its own writes and, for the writes of
other replicas, when identity hears a `role.*` event; reloaded after `ROLES_TTL` at the latest."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase

from services.identity.domain import Role, User


def _user(doc: dict) -> User:
    return User(
        username=doc["username"],
        roles=list(doc.get("roles", [])),
        creator=doc.get("creator", ""),
        password_hash=doc.get("password_hash", ""),
        created_at=doc.get("created_at"),
    )


def _role(doc: dict) -> Role:
    return Role(
        role_name=doc["role_name"],
        permissions=list(doc.get("permissions", [])),
        creator=doc.get("creator", ""),
        created_at=doc.get("created_at"),
    )


ROLES_TTL = 30.0


class IdentityStore:
    def __init__(self, db: AsyncDatabase) -> None:
        self.users = db["users"]
        self.roles = db["roles"]
        self._roles: dict[str, Role] | None = None  # every role, by name, in name order
        self._roles_until = 0.0
        self._roles_generation = 0

    async def ensure_indexes(self) -> None:
        await self.users.create_index([("username", ASCENDING)], unique=True)
        await self.roles.create_index([("role_name", ASCENDING)], unique=True)

    # --- users ---

    async def find_user(self, username: str) -> User | None:
        doc = await self.users.find_one({"username": username})
        return _user(doc) if doc else None

    async def find_users(self, username: str | None = None) -> list[User]:
        query = {"username": username} if username is not None else {}
        return [_user(doc) async for doc in self.users.find(query).sort("username", ASCENDING)]

    async def add_user_if_absent(self, user: User) -> bool:
        """Insert unless the name exists; True when inserted (idempotent bootstrap)."""
        result = await self.users.update_one(
            {"username": user.username},
            {"$setOnInsert": self._user_doc(user)},
            upsert=True,
        )
        return result.upserted_id is not None

    async def save_user(self, user: User) -> bool:
        """Create or update (roles, password); the creator and creation time stay as first
        written. True when created."""
        now = datetime.now(UTC)
        result = await self.users.update_one(
            {"username": user.username},
            {
                "$set": {"roles": user.roles, "password_hash": user.password_hash, "updated_at": now},
                "$setOnInsert": {"creator": user.creator, "created_at": now},
            },
            upsert=True,
        )
        return result.upserted_id is not None

    async def delete_users(self, names: list[str]) -> list[str]:
        found = [doc["username"] async for doc in self.users.find({"username": {"$in": names}})]
        if found:
            await self.users.delete_many({"username": {"$in": found}})
        return found

    # --- roles ---

    async def find_roles(self, names: list[str] | None = None) -> dict[str, Role]:
        """The named roles that exist (all of them without names), in name order."""
        roles = await self._all_roles()
        if names is None:
            return dict(roles)
        wanted = set(names)
        return {name: role for name, role in roles.items() if name in wanted}

    async def _all_roles(self) -> dict[str, Role]:
        now = time.monotonic()
        if self._roles is not None and now < self._roles_until:
            return self._roles
        generation = self._roles_generation
        cursor = self.roles.find({}).sort("role_name", ASCENDING)
        roles = {doc["role_name"]: _role(doc) async for doc in cursor}
        if generation == self._roles_generation:  # else a change came while reading: read again next time
            self._roles, self._roles_until = roles, now + ROLES_TTL
        return roles

    def forget_roles(self) -> None:
        self._roles_generation += 1
        self._roles = None

    async def add_role_if_absent(self, role: Role) -> bool:
        result = await self.roles.update_one(
            {"role_name": role.role_name},
            {"$setOnInsert": self._role_doc(role)},
            upsert=True,
        )
        self.forget_roles()
        return result.upserted_id is not None

    async def save_role(self, role: Role) -> bool:
        now = datetime.now(UTC)
        result = await self.roles.update_one(
            {"role_name": role.role_name},
            {
                "$set": {"permissions": role.permissions, "updated_at": now},
                "$setOnInsert": {"creator": role.creator, "created_at": now},
            },
            upsert=True,
        )
        self.forget_roles()
        return result.upserted_id is not None

    async def delete_roles(self, names: list[str]) -> list[str]:
        found = list(await self.find_roles(names))
        if found:
            await self.roles.delete_many({"role_name": {"$in": found}})
            self.forget_roles()
            await self.users.update_many({"roles": {"$in": found}}, {"$pull": {"roles": {"$in": found}}})
        return found

    @staticmethod
    def _user_doc(user: User) -> dict:
        return {
            "username": user.username,
            "roles": user.roles,
            "creator": user.creator,
            "password_hash": user.password_hash,
            "created_at": datetime.now(UTC),
        }

    @staticmethod
    def _role_doc(role: Role) -> dict:
        return {
            "role_name": role.role_name,
            "permissions": role.permissions,
            "creator": role.creator,
            "created_at": datetime.now(UTC),
        }
