"""The authorization matrix: every route, in both auth modes of API.md, called with no key, a
wrong key, no user, an unknown user and a user lacking the permission, gets what API.md says;
a user of another role never reaches someone else's checkpoint, job, dataset or endpoint; and
no secret ever lands in a log line.

`MATRIX` names every route of the gateway: a route added without an entry fails
`test_the_matrix_names_every_route`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute

from services.gateway.app import ROUTERS, create_app
from shared.settings import Settings
from tests.e2e.conftest import make_stack
from tests.support import wait_for

pytestmark = pytest.mark.e2e

FORBIDDEN = b'{"message":"Forbidden"}'
NO_ID = "00000000-0000-4000-8000-00000000abcd"


@dataclass(frozen=True)
class Entry:
    """What a route needs. `permissions`: any one of them (None: any known user; () : the key
    alone). `key_only`: ESD 1.5 serves it with the key alone (esd mode), answering `keyed`.
    `body`: a valid body, so that the checks after body validation are what answers."""

    permissions: tuple[str, ...] | None
    body: dict | None = None
    key_only: bool = False
    keyed: int | None = None  # the status a key-only call gets (esd mode)


ENDPOINT_BODY = {
    "endpoint_type": "Async",
    "instance_type": "cpu",
    "initial_instance_count": 1,
    "autoscaling_enabled": False,
    "assign_to_roles": ["IT Operator"],
}
TRAINING_BODY = {
    "lora_train_type": "kohya",
    "params": {
        "training_params": {"training_instance_type": "local", "fm_type": "sd_1_5", "model": "m", "dataset": "d"}
    },
}
DATASET_BODY = {"dataset_name": "d", "content": [{"filename": "a.png", "name": "a.png", "type": "image", "params": {}}]}
CHECKPOINT_BODY = {"checkpoint_type": "Lora", "filenames": [{"filename": "x.safetensors", "parts_number": 1}]}

MATRIX: dict[tuple[str, str], Entry] = {
    ("GET", "/ping"): Entry(()),
    ("GET", "/asyncapi"): Entry(()),
    ("GET", "/asyncapi.json"): Entry(()),
    ("POST", "/tokens"): Entry((), body={"username": "admin", "password": "not the password"}),
    ("DELETE", "/tokens"): Entry(None),
    ("GET", "/events"): Entry(None),
    ("GET", "/users"): Entry(None),
    ("POST", "/users"): Entry(("user:all", "user:create"), body={"username": "u", "password": "p", "roles": []}),
    ("DELETE", "/users"): Entry(("user:all",), body={"user_name_list": ["nobody-at-all"]}),
    ("GET", "/roles"): Entry(("role:all", "role:list")),
    ("POST", "/roles"): Entry(("role:all", "role:create"), body={"role_name": "r", "permissions": ["user:list"]}),
    ("DELETE", "/roles"): Entry(("role:all",), body={"role_name_list": ["no-such-role"]}, key_only=True, keyed=204),
    ("GET", "/checkpoints"): Entry(("checkpoint:all", "checkpoint:list")),
    ("GET", "/checkpoints/{checkpoint_id}"): Entry(("checkpoint:all", "checkpoint:list")),
    ("POST", "/checkpoints"): Entry(("checkpoint:all", "checkpoint:create"), body=CHECKPOINT_BODY),
    ("PUT", "/checkpoints/{checkpoint_id}"): Entry(
        ("checkpoint:all", "checkpoint:create"), body={"status": "Disabled"}, key_only=True, keyed=404
    ),
    ("DELETE", "/checkpoints"): Entry(
        ("checkpoint:all",), body={"checkpoint_id_list": [NO_ID]}, key_only=True, keyed=204
    ),
    ("GET", "/endpoints"): Entry(("sagemaker_endpoint:all", "sagemaker_endpoint:list")),
    ("POST", "/endpoints"): Entry(("sagemaker_endpoint:all", "sagemaker_endpoint:create"), body=ENDPOINT_BODY),
    ("DELETE", "/endpoints"): Entry(
        ("sagemaker_endpoint:all",), body={"endpoint_name_list": ["esd-async-nothing"]}, key_only=True, keyed=204
    ),
    ("POST", "/inferences"): Entry(
        ("inference:all", "inference:create"), body={"task_type": "rembg", "inference_type": "Async", "models": {}}
    ),
    ("PUT", "/inferences/{inference_id}/start"): Entry(("inference:all", "inference:create")),
    ("PUT", "/inferences/{inference_id}/cancel"): Entry(("inference:all", "inference:create")),
    ("GET", "/inferences/{inference_id}"): Entry(
        ("inference:all", "inference:list", "inference:create"), key_only=True, keyed=404
    ),
    ("GET", "/inferences/{inference_id}/events"): Entry(("inference:all", "inference:list", "inference:create")),
    ("GET", "/inferences"): Entry(("inference:all", "inference:list"), key_only=True, keyed=200),
    ("DELETE", "/inferences"): Entry(("inference:all",), body={"inference_id_list": [NO_ID]}, key_only=True, keyed=204),
    ("POST", "/trainings"): Entry(("train:all",), body=TRAINING_BODY),
    ("GET", "/trainings"): Entry(("train:all",)),
    ("GET", "/trainings/{training_id}"): Entry(("train:all",)),
    ("PUT", "/trainings/{training_id}/stop"): Entry(("train:all",)),
    ("DELETE", "/trainings"): Entry(("train:all",), body={"training_id_list": [NO_ID]}),
    ("POST", "/datasets"): Entry(("train:all",), body=DATASET_BODY),
    ("PUT", "/datasets/{dataset_name}"): Entry(("train:all",), body={"status": "Enabled"}),
    ("GET", "/datasets"): Entry(("train:all",)),
    ("GET", "/datasets/{dataset_name}"): Entry(("train:all",)),
    ("DELETE", "/datasets"): Entry(
        ("train:all",), body={"dataset_name_list": ["no-such-set"]}, key_only=True, keyed=204
    ),
}


def gateway_routes() -> set[tuple[str, str]]:
    """Every (method, path) the gateway serves: its routers' (each also under /prod) and any
    route declared on the application itself."""
    app = create_app(Settings(api_key="k"))
    routes = [route for router in ROUTERS for route in router.routes] + list(app.routes)
    return {(method, route.path) for route in routes if isinstance(route, APIRoute) for method in route.methods}


def test_the_matrix_names_every_route():
    assert gateway_routes() == set(MATRIX), "a route without a matrix entry, or an entry without a route"


def url(path: str) -> str:
    return re.sub(r"\{[a-z_]+\}", "no-such-thing", path)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


class Caller:
    """Raw calls with chosen credentials."""

    def __init__(self, stack) -> None:
        self.http = httpx.Client(base_url=stack.gateway_url, timeout=60)
        self.key = stack.api_key

    def __call__(self, method, path, *, key=True, user=None, token=None, json=None, **kwargs) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if key is True:
            headers["x-api-key"] = self.key
        elif key:
            headers["x-api-key"] = key
        if user is not None:
            headers["username"] = user
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        return self.http.request(method, path, headers=headers, json=json, **kwargs)

    def send(self, route: tuple[str, str], **credentials) -> httpx.Response:
        method, path = route
        entry = MATRIX[route]
        # a streaming route answers its error before streaming; a success is not awaited here
        return self(method, url(path), json=entry.body, **credentials)


def lacking_user(entry: Entry) -> str:
    """A known user holding none of the entry's permissions."""
    assert entry.permissions
    resources = {permission.split(":")[0] for permission in entry.permissions}
    return "only-roles" if "user" in resources else "only-users"


def make_user(
    call: Caller, name: str, permissions: list[str], *, password: str = "esd mode password 1", **admin
) -> None:
    role = f"{name}-role"
    assert call("POST", "/roles", **admin, json={"role_name": role, "permissions": permissions}).status_code == 201
    created = call("POST", "/users", **admin, json={"username": name, "password": password, "roles": [role]})
    assert created.status_code == 201, created.text


def refused_for_lack(response: httpx.Response, user: str, entry: Entry) -> None:
    assert response.status_code == 403, response.text
    assert response.json()["message"] == f"User {user} has no permissions: {list(entry.permissions)}"


# --- the esd mode (the default) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def esd(stack) -> Caller:
    call = Caller(stack)
    make_user(call, "only-users", ["user:list"], user="admin")
    make_user(call, "only-roles", ["role:list"], user="admin")
    return call


@pytest.mark.parametrize("route", sorted(MATRIX))
def test_esd_mode_route_checks(esd, route):
    entry = MATRIX[route]
    for key in (False, "wrong-key"):
        response = esd.send(route, key=key, user="admin")
        assert (response.status_code, response.content) == (403, FORBIDDEN)
    if entry.permissions == ():
        return  # the key alone opens it (its own checks are tested with tokens below)
    nobody = esd.send(route)
    if entry.key_only:
        assert nobody.status_code == entry.keyed, nobody.text  # served with the deployment's authority
    else:
        assert (nobody.status_code, nobody.json()["message"]) == (401, "Unauthorized")
    unknown = esd.send(route, user="nobody-known")
    assert unknown.status_code == 401, unknown.text
    if entry.permissions:
        user = lacking_user(entry)
        refused_for_lack(esd.send(route, user=user), user, entry)


def test_esd_mode_keeps_the_initial_bootstrap_of_api_md(esd):
    name = unique("first-run")
    response = esd("POST", "/users", json={"username": name, "password": "pw", "initial": True})
    assert response.status_code == 201
    (user,) = esd("GET", "/users", user="admin", params={"username": name}).json()["data"]["users"]
    assert user["roles"] == ["IT Operator"]


# --- another role's things --------------------------------------------------------------------


def make_checkpoint(call: Caller, user: str, checkpoint_type: str) -> tuple[str, str]:
    """An Active checkpoint of the user's roles (its file holds no real weights): id, file name."""
    name = unique(user) + ".safetensors"
    created = call(
        "POST",
        "/checkpoints",
        user=user,
        json={"checkpoint_type": checkpoint_type, "filenames": [{"filename": name, "parts_number": 1}]},
    )
    assert created.status_code == 201, created.text
    checkpoint_id = created.json()["data"]["checkpoint"]["id"]
    etag = httpx.put(created.json()["data"]["s3PresignUrl"][name][0], content=b"weights").headers["etag"]
    activated = call(
        "PUT",
        f"/checkpoints/{checkpoint_id}",
        user=user,
        json={"status": "Active", "multi_parts_tags": {name: [{"ETag": etag, "PartNumber": 1}]}},
    )
    assert activated.status_code == 200, activated.text
    return checkpoint_id, name


@pytest.fixture(scope="module")
def victims(esd, stack) -> dict:
    """A victim's checkpoint, dataset, endpoint and job, made by its own role."""
    victim, attacker = unique("victim"), unique("attacker")
    make_user(
        esd,
        victim,
        ["checkpoint:all", "inference:all", "train:all", "sagemaker_endpoint:all"],
        user="admin",
    )
    make_user(
        esd,
        attacker,
        ["checkpoint:create", "checkpoint:list", "inference:list", "inference:create", "train:all"]
        + ["sagemaker_endpoint:list"],
        user="admin",
    )

    checkpoint_id, name = make_checkpoint(esd, victim, "Lora")
    base_model_id, base_model = make_checkpoint(esd, victim, "Stable-diffusion")
    dataset = unique("victim-set")
    assert esd("POST", "/datasets", user=victim, json={**DATASET_BODY, "dataset_name": dataset}).status_code == 201
    endpoint = esd(
        "POST",
        "/endpoints",
        user=victim,
        json={
            **ENDPOINT_BODY,
            "endpoint_name": unique("vic"),
            "assign_to_roles": [f"{victim}-role"],
            "autoscaling_enabled": True,
            "min_instance_number": 0,
            "max_instance_number": 1,
        },
    )
    assert endpoint.status_code == 202, endpoint.text
    endpoint_name = endpoint.json()["data"]["endpoint_name"]

    def in_service():
        listed = esd("GET", "/endpoints", user=victim).json()["data"]["endpoints"]
        return any(e["endpoint_name"] == endpoint_name and e["endpoint_status"] == "InService" for e in listed)

    wait_for(in_service, timeout=180, what=f"endpoint {endpoint_name}")
    job = esd("POST", "/inferences", user=victim, json=MATRIX[("POST", "/inferences")].body)
    assert job.status_code == 201, job.text
    yield {
        "victim": victim,
        "attacker": attacker,
        "checkpoint": checkpoint_id,
        "checkpoint_name": name,
        "base_model": base_model,
        "base_model_id": base_model_id,
        "dataset": dataset,
        "endpoint": endpoint_name,
        "job": job.json()["data"]["inference"]["id"],
    }
    esd("DELETE", "/endpoints", user="admin", json={"endpoint_name_list": [endpoint_name]})


def job_ids(response: httpx.Response) -> set[str]:
    assert response.status_code == 200, response.text
    return {job["InferenceJobId"] for job in response.json()["data"]["inferences"]}


def test_naming_another_user_never_shows_its_jobs(esd, victims):
    attacker, victim, job = victims["attacker"], victims["victim"], victims["job"]
    assert job in job_ids(esd("GET", "/inferences", user=victim, params={"type": "rembg"}))
    for params in ({"type": "rembg"}, {"type": "rembg", "username": victim}):
        assert job not in job_ids(esd("GET", "/inferences", user=attacker, params=params))
    assert esd("GET", f"/inferences/{job}", user=attacker).status_code == 404
    # the deployment (a key-only call, ESD's behaviour) and an inference:all holder see it
    assert job in job_ids(esd("GET", "/inferences", params={"type": "rembg", "username": victim}))
    assert job in job_ids(esd("GET", "/inferences", user="admin", params={"type": "rembg", "username": victim}))


def test_another_roles_checkpoint_is_neither_listed_nor_changed(esd, victims):
    attacker, victim, checkpoint = victims["attacker"], victims["victim"], victims["checkpoint"]

    def listed(user: str, **params) -> set[str]:
        page = esd("GET", "/checkpoints", user=user, params={"per_page": 1000, **params}).json()["data"]
        return {item["id"] for item in page["checkpoints"]}

    assert checkpoint in listed(victim)
    assert checkpoint not in listed(attacker)
    assert checkpoint not in listed(attacker, username=victim)
    assert checkpoint in listed("admin", username=victim)
    assert esd("GET", f"/checkpoints/{checkpoint}", user=attacker).status_code == 404
    for body in ({"name": "stolen.safetensors"}, {"status": "Disabled"}):
        response = esd("PUT", f"/checkpoints/{checkpoint}", user=attacker, json=body)
        assert response.status_code == 404, response.text
    item = esd("GET", f"/checkpoints/{checkpoint}", user=victim).json()["data"]["checkpoint"]
    assert (item["status"], item["name"]) == ("Active", [victims["checkpoint_name"]])


def test_another_roles_endpoint_is_not_listed_by_naming_its_user(esd, victims):
    attacker, victim, endpoint = victims["attacker"], victims["victim"], victims["endpoint"]

    def listed(user: str, **params) -> set[str]:
        return {
            e["endpoint_name"] for e in esd("GET", "/endpoints", user=user, params=params).json()["data"]["endpoints"]
        }

    assert endpoint in listed(victim)
    assert endpoint not in listed(attacker)
    assert endpoint not in listed(attacker, username=victim)


def test_train_all_does_not_reach_another_roles_dataset(esd, victims):
    attacker, victim, dataset = victims["attacker"], victims["victim"], victims["dataset"]

    def listed(user: str) -> set[str]:
        return {d["datasetName"] for d in esd("GET", "/datasets", user=user).json()["data"]["datasets"]}

    assert dataset in listed(victim)
    assert dataset not in listed(attacker)
    assert esd("GET", f"/datasets/{dataset}", user=attacker).status_code == 404
    assert esd("PUT", f"/datasets/{dataset}", user=attacker, json={"status": "Enabled"}).status_code == 404
    assert esd("DELETE", "/datasets", user=attacker, json={"dataset_name_list": [dataset]}).status_code == 204
    assert esd("GET", f"/datasets/{dataset}", user=victim).status_code == 200  # still there


def test_another_roles_checkpoints_cannot_be_used_by_name_or_by_path(esd, victims):
    attacker, victim = victims["attacker"], victims["victim"]
    lora, base_model = victims["checkpoint_name"], victims["base_model"]
    endpoint = esd(
        "POST",
        "/endpoints",
        user="admin",
        json={**ENDPOINT_BODY, "endpoint_name": unique("att"), "assign_to_roles": [f"{attacker}-role"]}
        | {"autoscaling_enabled": True, "min_instance_number": 0, "max_instance_number": 1},
    )
    assert endpoint.status_code == 202, endpoint.text
    endpoint_name = endpoint.json()["data"]["endpoint_name"]
    try:
        wait_for(
            lambda: any(
                e["endpoint_name"] == endpoint_name and e["endpoint_status"] == "InService"
                for e in esd("GET", "/endpoints", user=attacker).json()["data"]["endpoints"]
            ),
            timeout=180,
            what=f"endpoint {endpoint_name}",
        )
        job = {
            "task_type": "txt2img",
            "inference_type": "Async",
            "sagemaker_endpoint_name": endpoint_name,
            "models": {"Stable-diffusion": [base_model], "Lora": [lora]},
        }
        refused = esd("POST", "/inferences", user=attacker, json=job)
        assert refused.status_code == 400, refused.text
        assert refused.json()["message"] == (
            f"checkpoint with name {base_model}, type Stable-diffusion is not found "
            f"checkpoint with name {lora}, type Lora is not found"
        )
    finally:
        esd("DELETE", "/endpoints", user="admin", json={"endpoint_name_list": [endpoint_name]})

    location = esd("GET", f"/checkpoints/{victims['base_model_id']}", user=victim).json()["data"]["checkpoint"]
    victims_model = f"{location['s3Location']}/{base_model}"
    bucket = location["s3Location"].removeprefix("s3://").split("/", 1)[0]
    dataset, victims_data = victims["dataset"], f"s3://{bucket}/dataset/{victims['dataset']}/"
    _, own_model = make_checkpoint(esd, attacker, "Stable-diffusion")

    def train(user: str, **training_params) -> str:
        params = {"training_instance_type": "local", "fm_type": "sd_1_5", **training_params}
        config = {"training": {"output_name": unique("lora")}}  # a name no other training took
        body = {"lora_train_type": "kohya", "params": {"training_params": params, "config_params": config}}
        response = esd("POST", "/trainings", user=user, json=body)
        assert response.status_code == 400, response.text
        return response.json()["message"]

    not_a_model = "is not an Active Stable-diffusion checkpoint"
    assert train(attacker, model=base_model, dataset=dataset) == (
        f"checkpoint with name {base_model}, type Stable-diffusion is not found"
    )
    assert (
        train(attacker, s3_model_path=victims_model, dataset=dataset) == f"s3_model_path {victims_model} {not_a_model}"
    )
    outside = f"s3://{bucket}/elsewhere/{own_model}"  # the attacker's file name, not its file
    assert train(attacker, s3_model_path=outside, dataset=dataset) == f"s3_model_path {outside} {not_a_model}"
    assert train(attacker, model=own_model, dataset=dataset) == f"dataset {dataset} is not found"
    assert train(attacker, model=own_model, s3_data_path=victims_data) == f"dataset {dataset} is not found"
    assert train(attacker, model=own_model, s3_data_path=location["s3Location"]) == (
        f"s3_data_path {location['s3Location']} is not in a dataset (s3://<bucket>/dataset/<name>/...)"
    )
    # the same paths reach the things for a user they are shared with (here: not Enabled yet)
    assert train("admin", s3_model_path=victims_model, s3_data_path=victims_data) == (
        f"dataset {dataset} is not Enabled yet: upload its files, then PUT status Enabled"
    )


# --- the token mode ---------------------------------------------------------------------------

PASSWORD = "a user's password 7"


@pytest.fixture(scope="module")
def token_stack(tmp_path_factory):
    running = make_stack(
        tmp_path_factory.mktemp("token-stack"),
        ESD_AUTH_MODE="token",
        ESD_SIGN_IN_FAILURES_PER_USER="3",
        ESD_SIGN_IN_FAILURES_PER_ADDRESS="50",
    )
    running.up()
    yield running
    running.down()


@pytest.fixture(scope="module")
def tokens(token_stack) -> dict:
    """Tokens of the admin and of users lacking permissions, and the secrets used."""
    call = Caller(token_stack)
    admin = call("POST", "/tokens", json={"username": "admin", "password": token_stack.admin_password})
    assert admin.status_code == 201, admin.text
    issued = {"admin": admin.json()["data"]["token"]}
    for name, permissions in (("only-users", ["user:list"]), ("only-roles", ["role:list"])):
        make_user(call, name, permissions, password=PASSWORD, token=issued["admin"])
        answer = call("POST", "/tokens", json={"username": name, "password": PASSWORD})
        assert answer.status_code == 201, answer.text
        issued[name] = answer.json()["data"]["token"]
    return issued


@pytest.fixture(scope="module")
def tok(token_stack) -> Caller:
    return Caller(token_stack)


@pytest.mark.parametrize("route", sorted(MATRIX))
def test_token_mode_route_checks(tok, tokens, route):
    entry = MATRIX[route]
    for key in (False, "wrong-key"):
        response = tok.send(route, key=key, token=tokens["admin"])
        assert (response.status_code, response.content) == (403, FORBIDDEN)
    if route == ("GET", "/ping"):
        assert tok.send(route).status_code == 200
        return
    if route == ("POST", "/tokens"):
        assert tok.send(route).status_code == 401  # a wrong password
        return
    # no key-only routes, and the `username` header (even the admin's) names nobody
    for credentials in ({}, {"user": "admin"}, {"token": "esd_" + "x" * 43}, {"token": "61646D696E"}):
        response = tok.send(route, **credentials)
        assert response.status_code == 401, (credentials, response.text)
        assert response.json()["message"].startswith("Unauthorized")
    if entry.permissions:
        user = lacking_user(entry)
        refused_for_lack(tok.send(route, token=tokens[user]), user, entry)


def test_token_mode_refuses_initial_creations(tok, tokens):
    for path, body in (
        ("/users", {"username": unique("boot"), "password": "pw", "initial": True}),
        ("/roles", {"role_name": unique("boot"), "permissions": ["user:all"], "initial": True}),
    ):
        assert tok("POST", path, json=body).status_code == 401
        refused = tok("POST", path, json=body, token=tokens["only-users"])
        assert refused.status_code == 403, refused.text
        assert "initial" in refused.json()["message"]


def test_a_token_acts_as_its_user_until_revoked(tok, token_stack):
    name = unique("tina")
    admin = tok("POST", "/tokens", json={"username": "admin", "password": token_stack.admin_password})
    admin_token = admin.json()["data"]["token"]
    make_user(tok, name, ["user:list"], password=PASSWORD, token=admin_token)
    issued = tok("POST", "/tokens", json={"username": name, "password": PASSWORD})
    assert issued.status_code == 201
    data = issued.json()["data"]
    assert data["username"] == name and data["token"].startswith("esd_") and data["expires_in"] > 0
    token, other = data["token"], tok("POST", "/tokens", json={"username": name, "password": PASSWORD})
    other_token = other.json()["data"]["token"]
    (me,) = tok("GET", "/users", token=token, params={"username": name}).json()["data"]["users"]
    assert me["username"] == name
    assert tok("DELETE", "/tokens", token=token).status_code == 204
    # refused at once (the revocation reached the gateway's cache as an event), and not by luck:
    # the other token of the same user still works
    assert tok("GET", "/users", token=token).status_code == 401
    assert tok("GET", "/users", token=other_token).status_code == 200
    assert tok("DELETE", "/tokens", token=other_token, params={"all": "true"}).status_code == 204
    assert tok("GET", "/users", token=other_token).status_code == 401
    # a changed password ends the sessions the old one opened
    fourth = tok("POST", "/tokens", json={"username": name, "password": PASSWORD}).json()["data"]["token"]
    assert tok("GET", "/users", token=fourth).status_code == 200
    changed = tok(
        "POST",
        "/users",
        token=admin_token,
        json={"username": name, "password": PASSWORD + " changed", "roles": [f"{name}-role"]},
    )
    assert changed.status_code == 201, changed.text
    assert tok("GET", "/users", token=fourth).status_code == 401
    # a deleted user's tokens die with it
    third = tok("POST", "/tokens", json={"username": name, "password": PASSWORD + " changed"}).json()["data"]["token"]
    assert tok("GET", "/users", token=third).status_code == 200
    assert tok("DELETE", "/users", token=admin_token, json={"user_name_list": [name]}).status_code == 204
    assert tok("GET", "/users", token=third).status_code == 401


def test_failed_password_checks_are_limited_per_user(tok, token_stack):
    name = unique("guessed")
    admin_token = tok("POST", "/tokens", json={"username": "admin", "password": token_stack.admin_password}).json()[
        "data"
    ]["token"]
    make_user(tok, name, ["user:list"], password=PASSWORD, token=admin_token)
    for _ in range(3):  # ESD_SIGN_IN_FAILURES_PER_USER
        assert tok("POST", "/tokens", json={"username": name, "password": "guess"}).status_code == 401
    limited = tok("POST", "/tokens", json={"username": name, "password": PASSWORD})
    assert limited.status_code == 429  # even the right password, while limited
    assert re.fullmatch(
        rf"too many failed sign-ins for user {name}: try again in \d+ seconds", limited.json()["message"]
    )
    # another user from the same address is not limited by it
    assert tok("POST", "/tokens", json={"username": "admin", "password": token_stack.admin_password}).status_code == 201


def test_the_cli_signs_in_with_a_password_and_uses_its_token(token_stack, tok, tmp_path):
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ESD_")},
        "ESD_CONFIG": str(tmp_path / "config.json"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }

    def esd(*args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "cli", *args], env=env, capture_output=True, text=True, timeout=120, **kwargs
        )

    login = ["login", "--url", token_stack.gateway_url, "--key", token_stack.api_key, "--user", "admin"]
    refused = esd(*login)  # a user without a token is nobody in the token mode
    assert refused.returncode == 1 and "esd login --password" in refused.stderr, refused.stderr
    signed_in = esd(*login, "--password", input=token_stack.admin_password + "\n")
    assert signed_in.returncode == 0, signed_in.stderr
    token = json.loads((tmp_path / "config.json").read_text())["token"]
    assert token.startswith("esd_")
    listed = esd("--json", "checkpoints", "list")
    assert listed.returncode == 0, listed.stderr
    assert esd("logout").returncode == 0
    assert tok("GET", "/users", token=token).status_code == 401  # revoked
    assert esd("checkpoints", "list").returncode == 1


# --- no secret in any log ---------------------------------------------------------------------


def test_no_secret_appears_in_any_log_line(esd, stack, victims, tok, token_stack, tokens):
    """After logins, tokens, uploads through presigned URLs (the fixtures above), no process's
    log holds the API key, a password, a token or a presigned URL's signature."""
    # a presigned upload whose signature we know, and a failed and a good sign-in to log
    created = tok(
        "POST",
        "/checkpoints",
        token=tokens["admin"],
        json={"checkpoint_type": "Lora", "filenames": [{"filename": unique("s") + ".safetensors", "parts_number": 1}]},
    )
    assert created.status_code == 201, created.text
    urls = [u for parts in created.json()["data"]["s3PresignUrl"].values() for u in parts]
    signatures = [re.search(r"X-Amz-Signature=([0-9a-f]+)", u).group(1) for u in urls]
    tok("POST", "/tokens", json={"username": "only-users", "password": "wrong " + PASSWORD})
    secrets = {
        "api key": [stack.api_key, token_stack.api_key],
        "admin password": [stack.admin_password, token_stack.admin_password],
        "user password": [PASSWORD, "esd mode password 1"],
        "token": list(tokens.values()),
        "signature": signatures,
    }
    logs = [*Path(stack.var_dir, "log").glob("*.log"), *Path(token_stack.var_dir, "log").glob("*.log")]
    names = [log_file.name for log_file in logs]
    assert names.count("gateway.log") == 2 and names.count("identity.log") == 2, names
    for log_file in logs:
        text = log_file.read_text(errors="replace")
        for what, values in secrets.items():
            for value in values:
                assert value not in text, f"{what} in {log_file.name}"
        assert "X-Amz-Signature=" not in text, f"a presigned URL in {log_file.name}"
