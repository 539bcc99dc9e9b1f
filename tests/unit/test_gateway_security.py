import asyncio
import time
from types import SimpleNamespace

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from services.gateway.security import (
    DEPLOYMENT,
    EdgeMiddleware,
    Principals,
    acting_username,
    current_principal,
    initial_actor,
    issued_token,
    require,
)
from shared.contracts.identity import Principal, TokenHolder
from shared.errors import EsdError, Forbidden, Unauthorized


def test_username_header_names_the_user():
    assert acting_username({"username": "alice"}) == "alice"


def test_username_header_wins_over_bearer():
    assert acting_username({"username": "alice", "authorization": "Bearer 626f62"}) == "alice"


def test_bearer_token_is_the_hex_of_the_username():
    assert acting_username({"authorization": "Bearer 61646D696E"}) == "admin"
    assert acting_username({"authorization": "bearer 61646d696e"}) == "admin"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"username": "  "},
        {"authorization": "Bearer xyz"},
        {"authorization": "Bearer "},
        {"authorization": "Basic 61646D696E"},
        {"authorization": "Bearer ff"},  # not UTF-8
    ],
)
def test_no_usable_identity_is_unauthorized(headers):
    with pytest.raises(Unauthorized):
        acting_username(headers)


async def _echo(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"size": len(body)})


def _client(max_body: int = 100) -> httpx.AsyncClient:
    app = Starlette(routes=[Route("/echo", _echo, methods=["POST"]), Route("/api", _echo)])
    app.add_exception_handler(EsdError, lambda request, exc: JSONResponse({"error": exc.message}, exc.status))
    edge = EdgeMiddleware(app, api_key="secret", max_body_bytes=max_body)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=edge), base_url="http://t")


async def test_missing_or_wrong_key_gets_apigateways_exact_403():
    async with _client() as client:
        for headers in ({}, {"x-api-key": "wrong"}):
            response = await client.post("/echo", headers=headers)
            assert response.status_code == 403
            assert response.content == b'{"message":"Forbidden"}'
            assert response.headers["x-api-version"] == "1.5.0"


async def test_right_key_passes_and_answers_carry_the_api_version():
    async with _client() as client:
        response = await client.post("/echo", headers={"x-api-key": "secret"}, content=b"abc")
        assert response.json() == {"size": 3}
        assert response.headers["x-api-version"] == "1.5.0"


async def test_documentation_needs_no_key():
    async with _client() as client:
        assert (await client.get("/api")).status_code == 200


async def test_declared_oversize_body_is_refused_before_reading():
    async with _client(max_body=10) as client:
        response = await client.post("/echo", headers={"x-api-key": "secret"}, content=b"x" * 11)
        assert response.status_code == 413
        assert "larger than 10 bytes" in response.json()["message"]


async def test_undeclared_oversize_body_is_cut_off_while_streaming():
    async def chunks():
        for _ in range(5):
            yield b"x" * 5

    async with _client(max_body=10) as client:
        response = await client.post("/echo", headers={"x-api-key": "secret"}, content=chunks())
        assert response.status_code == 413


class FakeRpc:
    def __init__(self) -> None:
        self.calls = 0
        self.gate: asyncio.Event | None = None

    async def call(self, command, message, *, timeout=None):
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        return Principal(username=message.username, roles=[], permissions=[f"p{self.calls}"])


async def test_principals_are_cached_until_identity_reports_a_change():
    rpc = FakeRpc()
    principals = Principals(rpc)  # type: ignore[arg-type]
    first = await principals.get("bob")
    assert (await principals.get("bob")) == first
    assert rpc.calls == 1
    principals.invalidate()
    assert (await principals.get("bob")).permissions == ["p2"]


async def test_an_answer_overtaken_by_a_change_is_not_cached():
    rpc = FakeRpc()
    rpc.gate = asyncio.Event()
    principals = Principals(rpc)  # type: ignore[arg-type]
    pending = asyncio.create_task(principals.get("bob"))
    await asyncio.sleep(0)
    principals.invalidate()  # a role changed while identity was answering
    rpc.gate.set()
    await pending
    await principals.get("bob")
    assert rpc.calls == 2


def test_only_an_issued_token_is_a_token_not_14s_hex_name():
    assert issued_token({"authorization": "Bearer esd_abc"}) == "esd_abc"
    assert issued_token({"authorization": "Bearer 61646D696E"}) is None
    assert issued_token({"username": "admin"}) is None


class FakeTokenRpc:
    def __init__(self, expires_in: float) -> None:
        self.calls = 0
        self.expires_in = expires_in

    async def call(self, command, message, *, timeout=None):
        self.calls += 1
        if message.token != "esd_good":
            raise Unauthorized("Unauthorized: the token is unknown, expired or revoked")
        principal = Principal(username="ann", roles=[], permissions=[])
        return TokenHolder(principal=principal, expires_at=time.time() + self.expires_in)


async def test_a_token_is_cached_until_a_change_and_never_past_its_expiry():
    rpc = FakeTokenRpc(expires_in=3600)
    principals = Principals(rpc)  # type: ignore[arg-type]
    assert (await principals.by_token("esd_good")).username == "ann"
    await principals.by_token("esd_good")
    assert rpc.calls == 1
    assert not any("esd_good" in key for key in principals._cache)  # only its digest is kept
    principals.invalidate()  # a token was revoked
    await principals.by_token("esd_good")
    assert rpc.calls == 2

    expired = FakeTokenRpc(expires_in=-1)
    principals = Principals(expired)  # type: ignore[arg-type]
    await principals.by_token("esd_good")
    await principals.by_token("esd_good")
    assert expired.calls == 2
    with pytest.raises(Unauthorized):
        await principals.by_token("esd_bad")


def _request(mode: str, headers: dict[str, str]) -> Request:
    state = SimpleNamespace(settings=SimpleNamespace(auth_mode=mode), principals=Principals(FakeTokenRpc(3600)))  # type: ignore[arg-type]
    app = SimpleNamespace(state=state)
    raw = [(name.encode(), value.encode()) for name, value in headers.items()]
    return Request({"type": "http", "headers": raw, "app": app, "method": "GET", "path": "/"})


async def test_the_token_mode_ignores_the_username_header_and_needs_a_token():
    with pytest.raises(Unauthorized) as refused:
        await current_principal(_request("token", {"username": "admin"}))
    assert "bearer token" in refused.value.message
    with pytest.raises(Unauthorized):
        await current_principal(_request("token", {"authorization": "Bearer 61646D696E"}))
    ann = await current_principal(_request("token", {"username": "admin", "authorization": "Bearer esd_good"}))
    assert ann.username == "ann"


async def test_the_token_mode_has_no_key_only_routes_and_no_initial_creations():
    with pytest.raises(Unauthorized):
        await require("inference:all", key_only=True)(_request("token", {}))
    assert await require("inference:all", key_only=True)(_request("esd", {})) is DEPLOYMENT
    with pytest.raises(Forbidden):
        await initial_actor(_request("token", {"authorization": "Bearer esd_good"}))
