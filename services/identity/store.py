"""Identity's MongoDB collections: `users` and `roles`, each unique by name.

Both are small (the people of a team and their roles) and read far more often than written:
roles by nearly every request (a principal is a user's roles' permissions), users by every
listing. This store keeps a snapshot of each in memory, so such a read costs no database round
trip: forgotten on its own writes and, for the writes of other replicas, when identity hears a
`user.*` or `role.*` event; reloaded after `SNAPSHOT_TTL` at the latest. Reads that decide a
change or a sign-in (`find_user`) always go to the database."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Generic, TypeVar

from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from services.identity.domain import Role, User
from shared.errors import Conflict
from shared.messaging import Event
from shared.outbox import LIVE, Outbox, embedded, entries, tombstone


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


SNAPSHOT_TTL = 30.0

T = TypeVar("T")


class Snapshot(Generic[T]):
    """A whole small collection held in memory, read again after `forget()` (called after
    every write that changes it) or after `ttl` seconds. A read that a change overtook (the
    change's `forget()` came while it was reading) answers its caller but is not kept."""

    def __init__(self, load: Callable[[], Awaitable[T]], ttl: float = SNAPSHOT_TTL) -> None:
        self.load = load
        self.ttl = ttl
        self.value: T | None = None
        self.until = 0.0
        self.generation = 0

    async def get(self) -> T:
        now = time.monotonic()
        if self.value is not None and now < self.until:
            return self.value
        generation = self.generation
        value = await self.load()
        if generation == self.generation:
            self.value, self.until = value, now + self.ttl
        return value

    def forget(self) -> None:
        self.generation += 1
        self.value = None


class IdentityStore:
    def __init__(self, db: AsyncDatabase, outbox: Outbox) -> None:
        self.users = db["users"]
        self.roles = db["roles"]
        self.tokens = db["tokens"]  # digests of bearer tokens, never the tokens
        self.failures = db["sign_in_failures"]  # failed password checks per user/address and window
        self.outbox = outbox
        outbox.watch(self.users, self.roles, self.tokens)
        self._users = Snapshot(self._all_users)  # every user, in name order
        self._roles = Snapshot(self._all_roles)  # every role, by name, in name order

    async def ensure_indexes(self) -> None:
        await self.users.create_index([("username", ASCENDING)], unique=True)
        await self.roles.create_index([("role_name", ASCENDING)], unique=True)
        await self.tokens.create_index([("digest", ASCENDING)], unique=True)
        await self.tokens.create_index([("username", ASCENDING)])
        await self.failures.create_index([("window", ASCENDING)])

    # --- users ---

    async def find_user(self, username: str) -> User | None:
        doc = await self.users.find_one({"username": username, **LIVE})
        return _user(doc) if doc else None

    async def find_users(self, username: str | None = None) -> list[User]:
        """Every user (or the one named), in name order, from the snapshot."""
        users = await self._users.get()
        return list(users) if username is None else [user for user in users if user.username == username]

    async def _all_users(self) -> list[User]:
        return [_user(doc) async for doc in self.users.find(LIVE).sort("username", ASCENDING)]

    def forget_users(self) -> None:
        self._users.forget()

    async def add_user_if_absent(self, user: User, created: Event) -> bool:
        """Insert unless the name exists, announcing it; True when inserted (idempotent
        bootstrap)."""
        result = await self.users.update_one(
            {"username": user.username},
            {"$setOnInsert": {**self._user_doc(user), **embedded(created)}},
            upsert=True,
        )
        if result.upserted_id is None:
            return False
        self.forget_users()
        await self.outbox.send(self.users, {"username": user.username})
        return True

    async def save_user(self, user: User, *, created: Event, updated: Event) -> bool:
        """Create or update (roles, password), announcing which it was; the creator and
        creation time stay as first written. True when created."""
        now = datetime.now(UTC)
        changes = {"roles": user.roles, "password_hash": user.password_hash, "updated_at": now}
        try:
            for _ in range(2):
                result = await self.users.update_one(
                    {"username": user.username, **LIVE}, {"$set": {**changes, **entries(updated)}}
                )
                if result.matched_count:
                    await self.outbox.send(self.users, {"username": user.username})
                    return False
                try:
                    await self.users.insert_one({**self._user_doc(user), "updated_at": now, **embedded(created)})
                except DuplicateKeyError:
                    continue  # created meanwhile (update it), or a deletion still going out
                await self.outbox.send(self.users, {"username": user.username})
                return True
            raise Conflict(f"user {user.username} is being deleted; try again")
        finally:
            self.forget_users()

    async def delete_users(self, names: list[str], deleted: Callable[[str], Event]) -> list[str]:
        gone = []
        for name in names:
            if (await self.users.update_one({"username": name, **LIVE}, tombstone(deleted(name)))).matched_count:
                gone.append(name)
                self.forget_users()
                await self.outbox.send(self.users, {"username": name})
        return gone

    # --- bearer tokens ---

    async def add_token(self, digest: str, username: str, expires_at: float) -> None:
        await self.tokens.insert_one(
            {"digest": digest, "username": username, "expires_at": expires_at, "created_at": datetime.now(UTC)}
        )

    async def token_owner(self, digest: str, now: float) -> tuple[str, float] | None:
        """Whose token this is and until when, if it exists and has not expired (an expired
        one is dropped)."""
        doc = await self.tokens.find_one({"digest": digest, **LIVE})
        if doc is None:
            return None
        if doc["expires_at"] <= now:
            await self.tokens.delete_one({"digest": digest})
            return None
        return doc["username"], float(doc["expires_at"])

    async def revoke_tokens(self, selector: dict, revoked: Event) -> int:
        """Delete the selected tokens and announce it once (gateways drop what they cached)."""
        docs = [doc async for doc in self.tokens.find({**selector, **LIVE}, {"digest": 1})]
        for doc in docs:
            await self.tokens.update_one({"digest": doc["digest"], **LIVE}, tombstone(revoked))
            await self.outbox.send(self.tokens, {"digest": doc["digest"]})
        return len(docs)

    async def drop_expired_tokens(self, now: float) -> None:
        await self.tokens.delete_many({"expires_at": {"$lte": now}})

    # --- failed password checks ---

    async def failures_in(self, keys: list[str], windows: list[int]) -> int:
        """Failures counted under any of `keys` in any of `windows`."""
        total = 0
        async for doc in self.failures.find({"key": {"$in": keys}, "window": {"$in": windows}}):
            total += int(doc.get("count", 0))
        return total

    async def count_failure(self, key: str, window: int) -> None:
        await self.failures.update_one({"key": key, "window": window}, {"$inc": {"count": 1}}, upsert=True)
        await self.failures.delete_many({"window": {"$lt": window - 1}})  # nothing older counts

    # --- roles ---

    async def find_roles(self, names: list[str] | None = None) -> dict[str, Role]:
        """The named roles that exist (all of them without names), in name order."""
        roles = await self._roles.get()
        if names is None:
            return dict(roles)
        wanted = set(names)
        return {name: role for name, role in roles.items() if name in wanted}

    async def _all_roles(self) -> dict[str, Role]:
        cursor = self.roles.find(LIVE).sort("role_name", ASCENDING)
        return {doc["role_name"]: _role(doc) async for doc in cursor}

    def forget_roles(self) -> None:
        self._roles.forget()

    async def add_role_if_absent(self, role: Role, created: Event) -> bool:
        result = await self.roles.update_one(
            {"role_name": role.role_name},
            {"$setOnInsert": {**self._role_doc(role), **embedded(created)}},
            upsert=True,
        )
        self.forget_roles()
        if result.upserted_id is None:
            return False
        await self.outbox.send(self.roles, {"role_name": role.role_name})
        return True

    async def save_role(self, role: Role, *, created: Event, updated: Event) -> bool:
        now = datetime.now(UTC)
        try:
            for _ in range(2):
                result = await self.roles.update_one(
                    {"role_name": role.role_name, **LIVE},
                    {"$set": {"permissions": role.permissions, "updated_at": now, **entries(updated)}},
                )
                if result.matched_count:
                    await self.outbox.send(self.roles, {"role_name": role.role_name})
                    return False
                try:
                    await self.roles.insert_one({**self._role_doc(role), "updated_at": now, **embedded(created)})
                except DuplicateKeyError:
                    continue
                await self.outbox.send(self.roles, {"role_name": role.role_name})
                return True
            raise Conflict(f"role {role.role_name} is being deleted; try again")
        finally:
            self.forget_roles()

    async def delete_roles(self, names: list[str], deleted: Callable[[str], Event]) -> list[str]:
        found = list(await self.find_roles(names))
        gone = []
        for name in found:
            if (await self.roles.update_one({"role_name": name, **LIVE}, tombstone(deleted(name)))).matched_count:
                gone.append(name)
        self.forget_roles()
        if gone:
            await self.users.update_many({"roles": {"$in": gone}}, {"$pull": {"roles": {"$in": gone}}})
            self.forget_users()
            for name in gone:
                await self.outbox.send(self.roles, {"role_name": name})
        return gone

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
