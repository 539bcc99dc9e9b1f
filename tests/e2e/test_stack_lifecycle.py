"""`make up` / `make down` semantics: idempotent start, clean stop, data kept across restarts."""

import socket

import pytest

from tests.e2e.conftest import Api, make_stack

pytestmark = pytest.mark.e2e


def pids(stack) -> dict[str, str]:
    return {path.stem: path.read_text().strip() for path in sorted((stack.var_dir / "run").glob("*.pid"))}


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_restart_keeps_users_and_roles_and_up_twice_starts_nothing_twice(tmp_path):
    stack = make_stack(tmp_path / "var")
    stack.up()
    try:
        api = Api(stack)
        assert api("POST", "/roles", json={"role_name": "Keeper", "permissions": ["train:list"]}).status_code == 201
        assert (
            api("POST", "/users", json={"username": "kept", "password": "pw", "roles": ["Keeper"]}).status_code == 201
        )

        started = pids(stack)
        assert {"gateway", "identity", "nx-27017"} <= set(started)
        stack.up()  # a second `make up`
        assert pids(stack) == started

        stack.down()
        assert not listening(stack.gateway_port)
        assert pids(stack) == {}

        stack.up()
        api = Api(stack)
        (kept,) = api("GET", "/users", params={"username": "kept"}).json()["data"]["users"]
        assert kept["roles"] == ["Keeper"]
        assert kept["permissions"] == ["train:list"]
        roles = api("GET", "/roles", params={"role": "Keeper"}).json()["data"]["roles"]
        assert roles == [{"role_name": "Keeper", "creator": "admin", "permissions": ["train:list"]}]
    finally:
        stack.down()
