"""Identity's wire contracts: HTTP bodies (validated by the gateway), the commands the gateway
sends (the body plus the acting user), replies, and events."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from shared.messaging import Event
from shared.permissions import ALL_PERMISSIONS
from shared.rpc import command

SERVICE = "identity"
DEFAULT_ROLE = "IT Operator"
BOOTSTRAP_ROLES = (DEFAULT_ROLE, "byoc")
PASSWORD_MASK = "********"
NOT_APPLICABLE = "not_applicable"

# an issued bearer token: this prefix, then 256 random bits (what tells it from 1.4's hex name)
TOKEN_PREFIX = "esd_"

Name = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Password = Annotated[str, StringConstraints(min_length=1, max_length=1024)]


class Body(BaseModel):
    """An HTTP body: unknown extra keys are ignored, as ESD clients send some (`creator`...)."""

    model_config = ConfigDict(extra="ignore")


WebhookEvent = Literal["start", "progress", "completed"]
WebhookUrl = Annotated[str, StringConstraints(min_length=1, max_length=2048, pattern=r"^https?://[^/?#\s]+")]


class Idempotent(BaseModel):
    """A creating command: a repeat with the same `Idempotency-Key` and body gets the first
    reply (shared/idempotency.py)."""

    idempotency_key: str | None = None
    request_fingerprint: str | None = None  # of the HTTP body, from the gateway


class Principal(BaseModel):
    """Who acts: a known user with the union of its roles' permissions."""

    username: str
    roles: list[str]
    permissions: list[str]


# --- HTTP bodies -------------------------------------------------------------------------


class CreateUserBody(Body):
    username: Name
    password: Password
    roles: list[Name] = Field(default_factory=list)
    initial: bool = False


class DeleteUsersBody(Body):
    user_name_list: Annotated[list[Name], Field(min_length=1, max_length=100)]


# checked by identity with ESD's message; the document lists them
Permission = Annotated[Name, Field(json_schema_extra={"enum": list(ALL_PERMISSIONS)})]


class CreateRoleBody(Body):
    role_name: Name
    permissions: Annotated[list[Permission], Field(min_length=1, max_length=100)]
    initial: bool = False


class DeleteRolesBody(Body):
    role_name_list: Annotated[list[Name], Field(min_length=1, max_length=100)]


class CreateTokenBody(Body):
    username: Name
    password: Password


# --- commands (RPC) ------------------------------------------------------------------------


class AuthenticateUser(BaseModel):
    username: str


class IssueToken(CreateTokenBody):
    address: str  # the caller's, for the limit on failed password checks


class AuthenticateToken(BaseModel):
    token: str


class RevokeTokens(BaseModel):
    actor: Principal
    token: str  # the one the caller presents
    all: bool = False


class CreateUser(CreateUserBody, Idempotent):
    actor: Principal | None = None  # None only for `initial`, which needs no permission


class ListUsers(BaseModel):
    actor: Principal
    username: str | None = None


class DeleteUsers(DeleteUsersBody):
    actor: Principal


class CreateRole(CreateRoleBody, Idempotent):
    actor: Principal | None = None


class ListRoles(BaseModel):
    actor: Principal
    role: str | None = None


class DeleteRoles(DeleteRolesBody):
    actor: Principal


# --- replies -------------------------------------------------------------------------------


class UserView(BaseModel):
    username: str
    roles: list[str]
    creator: str
    permissions: list[str]
    password: str = PASSWORD_MASK


class UserList(BaseModel):
    users: list[UserView]
    last_evaluated_key: str = NOT_APPLICABLE


class RoleView(BaseModel):
    role_name: str
    creator: str
    permissions: list[str]


class RoleList(BaseModel):
    roles: list[RoleView]
    last_evaluated_key: str = NOT_APPLICABLE
    previous_evaluated_key: str = NOT_APPLICABLE


class IssuedToken(BaseModel):
    token: str  # shown this once: only its digest is stored
    username: str
    expires_at: float  # Unix time
    expires_in: int  # seconds


class TokenHolder(BaseModel):
    """Who a valid token acts for, until when."""

    principal: Principal
    expires_at: float


# --- events --------------------------------------------------------------------------------


class UserCreated(Event):
    routing_key = "user.created"
    username: str
    roles: list[str]
    creator: str


class UserUpdated(Event):
    routing_key = "user.updated"
    username: str
    roles: list[str]


class UserDeleted(Event):
    routing_key = "user.deleted"
    username: str


class RoleCreated(Event):
    routing_key = "role.created"
    role_name: str
    permissions: list[str]
    creator: str


class RoleUpdated(Event):
    routing_key = "role.updated"
    role_name: str
    permissions: list[str]


class RoleDeleted(Event):
    routing_key = "role.deleted"
    role_name: str


class TokenRevoked(Event):
    routing_key = "token.revoked"
    username: str


# --- the commands (request -> reply) ---------------------------------------------------------

AUTHENTICATE_USER = command(SERVICE, AuthenticateUser, Principal)
CREATE_USER = command(SERVICE, CreateUser)
LIST_USERS = command(SERVICE, ListUsers, UserList)
DELETE_USERS = command(SERVICE, DeleteUsers)
CREATE_ROLE = command(SERVICE, CreateRole, RoleView)
LIST_ROLES = command(SERVICE, ListRoles, RoleList)
DELETE_ROLES = command(SERVICE, DeleteRoles)
ISSUE_TOKEN = command(SERVICE, IssueToken, IssuedToken)
AUTHENTICATE_TOKEN = command(SERVICE, AuthenticateToken, TokenHolder)
REVOKE_TOKENS = command(SERVICE, RevokeTokens)
