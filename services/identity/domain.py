"""Identity's decisions: who may see, create, change and delete users and roles. Pure
functions over plain records; the handlers load the records and store the outcome."""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from shared.contracts.identity import DEFAULT_ROLE, TOKEN_PREFIX, Principal, RoleView, UserView
from shared.errors import Forbidden, Invalid, TooManyRequests
from shared.permissions import ALL_PERMISSIONS, allows, is_valid, not_grantable


@dataclass(frozen=True)
class User:
    username: str
    roles: list[str]
    creator: str
    password_hash: str = ""
    created_at: datetime | None = None


@dataclass(frozen=True)
class Role:
    role_name: str
    permissions: list[str]
    creator: str
    created_at: datetime | None = field(default=None, compare=False)


def permissions_of(role_names: Iterable[str], roles: Mapping[str, Role]) -> list[str]:
    """The union of the permissions of the named roles (unknown names grant nothing), sorted."""
    held: set[str] = set()
    for name in role_names:
        role = roles.get(name)
        if role is not None:
            held.update(role.permissions)
    return sorted(held)


def principal_of(user: User, roles: Mapping[str, Role]) -> Principal:
    return Principal(username=user.username, roles=user.roles, permissions=permissions_of(user.roles, roles))


def user_view(user: User, roles: Mapping[str, Role]) -> UserView:
    return UserView(
        username=user.username,
        roles=user.roles,
        creator=user.creator,
        permissions=permissions_of(user.roles, roles),
    )


def role_view(role: Role) -> RoleView:
    return RoleView(role_name=role.role_name, creator=role.creator, permissions=role.permissions)


def acting(actor: Principal | None) -> Principal:
    """The acting user of a command that needs one (only `initial` creations come without)."""
    if actor is None:  # the gateway always sends one; a missing one is a caller's bug
        raise Invalid("the acting user is missing")
    return actor


def visible_users(actor: Principal, users: Iterable[User]) -> list[User]:
    """With `user:list` (or `:all`) a user sees everyone; without it, only itself."""
    if allows(actor.permissions, "user:list"):
        return list(users)
    return [user for user in users if user.username == actor.username]


def check_permission_names(permissions: Iterable[str]) -> None:
    unknown = [permission for permission in permissions if not is_valid(permission)]
    if unknown:
        raise Invalid(f"unknown permissions {unknown}, each must be one of {list(ALL_PERMISSIONS)}")


def check_grant(actor: Principal, permissions: Iterable[str]) -> None:
    """A creator lacking `role:all` may only pass on permissions it holds itself."""
    if allows(actor.permissions, "role:all"):
        return
    refused = not_grantable(actor.permissions, permissions)
    if refused:
        raise Forbidden(f"creator {actor.username} has no permission to assign permissions {refused} to others")


def check_roles_exist(wanted: Iterable[str], roles: Mapping[str, Role]) -> None:
    for name in wanted:
        if name not in roles:
            raise Invalid(f'user roles "{name}" not exist')


def check_user_change(actor: Principal, existing: User | None) -> None:
    """Changing an existing user takes `user:all`, or being the one who created it."""
    if existing is None or allows(actor.permissions, "user:all"):
        return
    if existing.creator != actor.username:
        raise Invalid(
            f"username {existing.username} has already exists, "
            f"creator {actor.username} does not have permissions to change it"
        )


def check_role_change(actor: Principal, existing: Role | None) -> None:
    if existing is None or allows(actor.permissions, "role:all"):
        return
    if existing.creator != actor.username:
        raise Invalid(f"creator {actor.username} does not have permission to update role {existing.role_name}")


def check_user_deletion(actor: Principal, names: Iterable[str]) -> None:
    if actor.username in names:
        raise Invalid(f"user {actor.username} cannot delete itself")


def check_role_deletion(names: Iterable[str]) -> None:
    if DEFAULT_ROLE in names:
        raise Invalid("cannot delete default role")


# --- bearer tokens and sign-in limits --------------------------------------------------------


def new_token() -> str:
    """A bearer token: 256 random bits, URL-safe, behind a prefix that tells it apart."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str, key: bytes) -> str:
    """What is stored of a token. A fast keyed hash is enough: a token is a random 256-bit
    secret, so nothing can be guessed from its digest (passwords, chosen by people, stay argon2)."""
    return hmac.new(key, token.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class SignInLimit:
    """Failed password checks allowed per user and per address within a window; the failures
    of the current and the previous window count, so a burst across a boundary gains nothing."""

    per_user: int
    per_address: int
    window: float

    def window_of(self, now: float) -> int:
        return int(now // self.window)

    def check(self, *, username: str, user_failures: int, address_failures: int, now: float) -> None:
        """Refuse (429) a sign-in whose user or address failed too often lately, before its
        password is even checked: a right guess must not be told apart from a wrong one."""
        if user_failures < self.per_user and address_failures < self.per_address:
            return
        seconds = math.ceil((self.window_of(now) + 1) * self.window - now + self.window)
        who = f"user {username}" if user_failures >= self.per_user else "this address"
        raise TooManyRequests(f"too many failed sign-ins for {who}: try again in {seconds} seconds")
