"""Bearer tokens: a user signs in with its password and gets a token, which then stands for it
on every request (`ESD_AUTH_MODE=token`) until it expires or is revoked. Only a token's digest
is stored; failed password checks are limited per user and per client address."""

from __future__ import annotations

import time

import structlog

from services.identity import domain
from services.identity.passwords import hash_password, verify_password
from services.identity.store import IdentityStore
from shared.contracts.identity import (
    AuthenticateToken,
    IssuedToken,
    IssueToken,
    RevokeTokens,
    TokenHolder,
    TokenRevoked,
)
from shared.errors import Unauthorized

log = structlog.get_logger(__name__)

BAD_CREDENTIALS = "Unauthorized: wrong username or password"
BAD_TOKEN = "Unauthorized: the token is unknown, expired or revoked"


class Tokens:
    def __init__(self, store: IdentityStore, *, key: bytes, ttl: float, limit: domain.SignInLimit) -> None:
        self.store = store
        self.key = key
        self.ttl = ttl
        self.limit = limit
        self._decoy_hash: str | None = None

    async def issue(self, command: IssueToken) -> IssuedToken:
        now = time.time()
        window = self.limit.window_of(now)
        windows = [window - 1, window]
        user_key, address_key = f"user:{command.username}", f"address:{command.address}"
        self.limit.check(
            username=command.username,
            user_failures=await self.store.failures_in([user_key], windows),
            address_failures=await self.store.failures_in([address_key], windows),
            now=now,
        )
        user = await self.store.find_user(command.username)
        # an unknown user costs a password check too: the answer's timing tells nothing
        password_hash = user.password_hash if user is not None else await self._decoy()
        if not await verify_password(password_hash, command.password) or user is None:
            for key in (user_key, address_key):
                await self.store.count_failure(key, window)
            log.warning("token.sign_in_failed", username=command.username, address=command.address)
            raise Unauthorized(BAD_CREDENTIALS)
        token = domain.new_token()
        expires_at = now + self.ttl
        await self.store.add_token(domain.token_digest(token, self.key), user.username, expires_at)
        await self.store.drop_expired_tokens(now)
        log.info("token.issued", username=user.username, address=command.address, expires_at=expires_at)
        return IssuedToken(token=token, username=user.username, expires_at=expires_at, expires_in=int(self.ttl))

    async def _decoy(self) -> str:
        if self._decoy_hash is None:
            self._decoy_hash = await hash_password(domain.new_token())
        return self._decoy_hash

    async def authenticate(self, command: AuthenticateToken) -> TokenHolder:
        owner = await self.store.token_owner(domain.token_digest(command.token, self.key), time.time())
        user = await self.store.find_user(owner[0]) if owner is not None else None
        if owner is None or user is None:  # a deleted user's tokens die with it
            raise Unauthorized(BAD_TOKEN)
        principal = domain.principal_of(user, await self.store.find_roles(user.roles))
        return TokenHolder(principal=principal, expires_at=owner[1])

    async def revoke(self, command: RevokeTokens) -> None:
        username = command.actor.username
        if command.all:
            selector = {"username": username}
        else:
            selector = {"digest": domain.token_digest(command.token, self.key), "username": username}
        revoked = await self.store.revoke_tokens(selector, TokenRevoked(username=username))
        log.info("token.revoked", username=username, tokens=revoked)
