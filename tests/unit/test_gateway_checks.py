"""The gateway's order of checks and ESD's key-only routes (../shared/API.md), on the real
FastAPI app with the services replaced by a recording stand-in: API key (403), then the body
(400, with or without a user), then the user (401), then the permission (403)."""

import pytest
from fastapi.testclient import TestClient

from services.gateway.app import create_app
from services.gateway.security import DEPLOYMENT, Principals
from shared.contracts.checkpoint import UpdatedCheckpoint
from shared.contracts.identity import AUTHENTICATE_USER, Principal
from shared.contracts.inference import (
    EndpointType,
    InferencePage,
    InferenceParams,
    InferenceView,
    JobStatus,
)
from shared.errors import Unauthorized
from shared.permissions import EVERY_ALL
from shared.settings import Settings

KEY = "the-key"
USERS = {
    "admin": Principal(username="admin", roles=["IT Operator"], permissions=list(EVERY_ALL)),
    "viewer": Principal(username="viewer", roles=["viewers"], permissions=["inference:list"]),
}
JOB = InferenceView(
    img_presigned_urls=[],
    output_presigned_urls=[],
    inference_info_name="j_param.json",
    InferenceJobId="j",
    status=JobStatus.CREATED,
    taskType="txt2img",
    inference_type=EndpointType.ASYNC,
    createTime=None,
    startTime=None,
    completeTime=None,
    image_names=[],
    owner_group_or_role=["admin"],
    params=InferenceParams(
        input_body_presign_url="u",
        input_body_s3="s3://esd/x",
        used_models={},
        sagemaker_inference_endpoint_id="e",
        sagemaker_inference_endpoint_name="esd-async-x",
        sagemaker_inference_instance_type="local",
    ),
)
REPLIES = {
    "get_inference": JOB,
    "list_inferences": InferencePage(inferences=[]),
    "update_checkpoint": UpdatedCheckpoint(status=200),
}


class Services:
    """Answers like the services would, and remembers who acted in each command."""

    def __init__(self) -> None:
        self.actors: list[tuple[str, str]] = []

    async def call(self, command, request, *, timeout=None):
        if command is AUTHENTICATE_USER:
            if request.username not in USERS:
                raise Unauthorized("Unauthorized")
            return USERS[request.username]
        actor = getattr(request, "actor", None)
        self.actors.append((command.name, actor.username if actor else ""))
        return REPLIES.get(command.name)


@pytest.fixture
def gateway():
    app = create_app(Settings(api_key=KEY))
    services = Services()
    app.state.rpc = services
    app.state.principals = Principals(services)  # type: ignore[arg-type]
    return TestClient(app), services


# ESD 1.5.0 serves these with the API key alone (API.md, "Key-only routes").
KEY_ONLY = [
    ("PUT", "/checkpoints/c1", {"status": "Disabled"}, "update_checkpoint"),
    ("DELETE", "/checkpoints", {"checkpoint_id_list": ["c1"]}, "delete_checkpoints"),
    ("DELETE", "/datasets", {"dataset_name_list": ["d1"]}, "delete_datasets"),
    ("DELETE", "/endpoints", {"endpoint_name_list": ["esd-async-x"]}, "delete_endpoints"),
    ("GET", "/inferences", None, "list_inferences"),
    ("GET", "/inferences/j", None, "get_inference"),
    ("DELETE", "/inferences", {"inference_id_list": ["j"]}, "delete_inferences"),
    ("DELETE", "/roles", {"role_name_list": ["r"]}, "delete_roles"),
]


@pytest.mark.parametrize("method, path, body, command", KEY_ONLY)
def test_key_only_routes_act_with_the_deployments_authority(gateway, method, path, body, command):
    client, services = gateway
    response = client.request(method, path, json=body, headers={"x-api-key": KEY})
    assert response.status_code < 300, response.text
    assert services.actors == [(command, DEPLOYMENT.username)]
    for prefix in ("/prod",):  # the API Gateway stage form too
        assert client.request(method, prefix + path, json=body, headers={"x-api-key": KEY}).status_code < 300


@pytest.mark.parametrize("method, path, body, command", KEY_ONLY)
def test_a_key_only_call_that_names_a_user_is_that_users(gateway, method, path, body, command):
    client, services = gateway
    unknown = client.request(method, path, json=body, headers={"x-api-key": KEY, "username": "nobody"})
    assert unknown.status_code == 401
    named = client.request(method, path, json=body, headers={"x-api-key": KEY, "username": "admin"})
    assert named.status_code < 300, named.text
    assert services.actors == [(command, "admin")]


@pytest.mark.parametrize("method, path, body, command", KEY_ONLY)
def test_without_the_key_even_key_only_routes_are_forbidden(gateway, method, path, body, command):
    client, services = gateway
    response = client.request(method, path, json=body, headers={"x-api-key": "wrong"})
    assert (response.status_code, response.json()) == (403, {"message": "Forbidden"})
    assert services.actors == []


def routes_with_a_body(app) -> list[tuple[str, str]]:
    """Every (method, path) whose document says it takes a body, also under /prod."""
    found = []
    for path, operations in app.openapi()["paths"].items():
        concrete = path.replace("{checkpoint_id}", "c1").replace("{dataset_name}", "d1")
        for method, operation in operations.items():
            if "requestBody" in operation:
                found += [(method.upper(), concrete), (method.upper(), "/prod" + concrete)]
    return found


def test_a_bad_body_is_a_400_before_anyone_is_asked_who_calls(gateway):
    client, services = gateway
    checked = routes_with_a_body(client.app)
    assert len(checked) >= 20  # every route that takes a body, /prod ones included
    for method, path in checked:
        for body in (b"[1]", b"{not json", b'{"status": 7, "user_name_list": 3}'):
            response = client.request(method, path, content=body, headers={"x-api-key": KEY})
            assert response.status_code == 400, (method, path, body, response.text)
    assert services.actors == []


def test_then_the_user_then_the_permission(gateway):
    client, _ = gateway
    body = {"endpoint_name_list": ["x"]}
    no_user = client.post("/endpoints", json={**body}, headers={"x-api-key": KEY})
    assert no_user.status_code == 400  # not a valid endpoint body: the body comes first
    valid = {"endpoint_type": "Async", "instance_type": "local", "initial_instance_count": 1, "assign_to_roles": ["r"]}
    assert client.post("/endpoints", json=valid, headers={"x-api-key": KEY}).status_code == 401
    forbidden = client.post("/endpoints", json=valid, headers={"x-api-key": KEY, "username": "viewer"})
    assert forbidden.status_code == 403
    assert "viewer has no permissions" in forbidden.json()["message"]


def test_routes_that_are_not_key_only_need_a_user(gateway):
    client, services = gateway
    for method, path in (("GET", "/checkpoints"), ("GET", "/endpoints"), ("GET", "/trainings"), ("GET", "/users")):
        assert client.request(method, path, headers={"x-api-key": KEY}).status_code == 401
    assert services.actors == []
