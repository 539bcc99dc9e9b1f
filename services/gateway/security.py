"""Who is calling and what they may do.

- The API key (`x-api-key`) is the deployment's credential: checked at the edge, before routing.
- The acting user comes, in the `esd` auth mode (the default), from the `username` header (1.5)
  or `Authorization: Bearer <hex of the username>` (1.4), and must exist (401). A bearer token
  issued by `POST /tokens` (`esd_...`) names its user in either mode; in the `token` mode it is
  the only way (the `username` header is ignored) and every route but /ping needs one.
- Permissions come from identity by RPC, cached per user (or token) and dropped whenever
  identity reports a change to any user, role or token, so a revoked permission or token stops
  working at once."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Iterable

import structlog
from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.envelope import forbidden_api_key, respond
from shared.contracts.identity import (
    AUTHENTICATE_TOKEN,
    AUTHENTICATE_USER,
    TOKEN_PREFIX,
    AuthenticateToken,
    AuthenticateUser,
    Principal,
)
from shared.errors import Forbidden, Invalid, PayloadTooLarge, Unauthorized
from shared.permissions import EVERY_ALL, allows_any
from shared.rpc import RpcClient
from shared.settings import API_VERSION

log = structlog.get_logger(__name__)

# Documentation pages carry no data and a browser opening them sends no key.
OPEN_PATHS = frozenset({"/api", "/docs", "/docs/oauth2-redirect", "/prod/api", "/prod/docs"})


class EdgeMiddleware:
    """Pure ASGI middleware: API key, request size limit, `x-api-version` on every answer."""

    def __init__(self, app: ASGIApp, *, api_key: str, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key.encode()
        self.max_body_bytes = max_body_bytes
        self.version_header = (b"x-api-version", API_VERSION.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_versioned(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), self.version_header]
            await send(message)

        headers = dict(scope["headers"])
        if scope["path"] not in OPEN_PATHS and not hmac.compare_digest(headers.get(b"x-api-key", b""), self.api_key):
            await forbidden_api_key()(scope, receive, send_versioned)
            return
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await respond(400, message="invalid Content-Length")(scope, receive, send_versioned)
                return
            if int(declared) > self.max_body_bytes:
                await self._too_large()(scope, receive, send_versioned)
                return
        await self.app(scope, self._limited(receive), send_versioned)

    def _too_large(self):
        return respond(413, message=f"request body is larger than {self.max_body_bytes} bytes")

    def _limited(self, receive: Receive) -> Receive:
        # a chunked body declares no length: count what arrives
        seen = 0
        limit = self.max_body_bytes

        async def receive_limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(f"request body is larger than {limit} bytes")
            return message

        return receive_limited


TOKEN_REQUIRED = "Unauthorized: this deployment needs a bearer token (POST /tokens)"


def issued_token(headers: dict[str, str] | object) -> str | None:
    """The bearer token of `POST /tokens` a request presents, if any (1.4's hex name is not one)."""
    authorization = headers.get("authorization")  # type: ignore[union-attr]
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token.startswith(TOKEN_PREFIX) else None


def names_a_user(headers: dict[str, str] | object) -> bool:
    """Whether a request says who acts (a `username` header or a bearer token), rightly or not."""
    username = headers.get("username")  # type: ignore[union-attr]
    authorization = headers.get("authorization")  # type: ignore[union-attr]
    return bool((username and username.strip()) or (authorization and authorization.strip()))


def acting_username(headers: dict[str, str] | object) -> str:
    """The user a request acts as: `username` header, else 1.4's hex bearer token."""
    username = headers.get("username")  # type: ignore[union-attr]
    if username and username.strip():
        return username.strip()
    authorization = headers.get("authorization")  # type: ignore[union-attr]
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            try:
                name = bytes.fromhex(token.strip()).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                raise Unauthorized("Unauthorized") from None
            if name.strip():
                return name.strip()
    raise Unauthorized("Unauthorized")


class Principals:
    """Principals by username or by token, from identity, cached until identity reports any
    change (and a token's no longer than it lives)."""

    MAX_ENTRIES = 10_000

    def __init__(self, rpc: RpcClient, ttl: float = 60.0) -> None:
        self.rpc = rpc
        self.ttl = ttl
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._generation = 0

    async def get(self, username: str) -> Principal:
        hit = self._hit(username)
        if hit is not None:
            return hit
        generation = self._generation
        principal = await self.rpc.call(AUTHENTICATE_USER, AuthenticateUser(username=username))
        self._keep(generation, username, principal, self.ttl)
        return principal

    async def by_token(self, token: str) -> Principal:
        # cached under the token's digest: the cache holds no usable secret
        key = "token:" + hashlib.sha256(token.encode()).hexdigest()
        hit = self._hit(key)
        if hit is not None:
            return hit
        generation = self._generation
        holder = await self.rpc.call(AUTHENTICATE_TOKEN, AuthenticateToken(token=token))
        self._keep(generation, key, holder.principal, min(self.ttl, holder.expires_at - time.time()))
        return holder.principal

    def _hit(self, key: str) -> Principal | None:
        hit = self._cache.get(key)
        return hit[0] if hit is not None and hit[1] > time.monotonic() else None

    def _keep(self, generation: int, key: str, principal: Principal, ttl: float) -> None:
        # an invalidation that arrived while we asked makes this answer possibly stale
        if generation == self._generation and ttl > 0:
            if len(self._cache) >= self.MAX_ENTRIES:
                self._cache.clear()
            self._cache[key] = (principal, time.monotonic() + ttl)

    def invalidate(self) -> None:
        self._generation += 1
        self._cache.clear()


def rpc(request: Request) -> RpcClient:
    """The gateway's client for calling the services."""
    return request.app.state.rpc


def check_permissions(principal: Principal, required: Iterable[str]) -> None:
    required = list(required)
    if not allows_any(principal.permissions, required):
        raise Forbidden(f"User {principal.username} has no permissions: {required}")


def token_mode(request: Request) -> bool:
    return request.app.state.settings.auth_mode == "token"


async def current_principal(request: Request) -> Principal:
    principals: Principals = request.app.state.principals
    token = issued_token(request.headers)
    if token is not None:
        return await principals.by_token(token)
    if token_mode(request):
        raise Unauthorized(TOKEN_REQUIRED)
    return await principals.get(acting_username(request.headers))


async def key_holder(request: Request) -> None:
    """Routes open to the API key alone (documents): in the token mode, a token is needed too."""
    if token_mode(request):
        await current_principal(request)


async def initial_actor(request: Request) -> Principal | None:
    """Who makes an `initial` (first-run bootstrap) creation: in the `esd` mode the key suffices
    (the caller if it names a known user, else None), as API.md says. In the `token` mode
    `initial` is refused: it would let any key holder make an IT Operator."""
    if token_mode(request):
        principal = await current_principal(request)
        raise Forbidden(f"User {principal.username}: initial creations are refused in the token auth mode")
    try:
        return await current_principal(request)
    except Unauthorized:
        return None


async def named_user(request: Request, username: str) -> Principal:
    """A user named in a query (`?username=`), which must exist (400 otherwise, as ESD). It
    only narrows what the caller sees; it never acts."""
    try:
        return await request.app.state.principals.get(username)
    except Unauthorized:
        raise Invalid(f'user: "{username}" not exist') from None


# Who acts in a call that ESD serves with the API key alone and that names no user: the
# deployment itself, with every permission (the key is the deployment's credential).
DEPLOYMENT = Principal(username="@deployment", roles=[], permissions=list(EVERY_ALL))


def require(*permissions: str, key_only: bool = False) -> Callable:
    """A dependency: the acting user, holding at least one of `permissions`. On the routes ESD
    1.5 serves with the key alone (`key_only`), a call that names no user acts with the
    deployment's authority (logged as such) in the `esd` auth mode; one that names a user is
    checked as that user. The `token` mode has no key-only route."""

    async def dependency(request: Request) -> Principal:
        if key_only and not token_mode(request) and not names_a_user(request.headers):
            log.info("request.key_only", method=request.method, path=request.url.path)
            return DEPLOYMENT
        principal = await current_principal(request)
        check_permissions(principal, permissions)
        return principal

    return dependency
