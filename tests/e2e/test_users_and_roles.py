"""Users and roles through HTTP, as an ESD client sees them."""

import time
import uuid

import pytest

pytestmark = pytest.mark.e2e


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def test_ping_needs_the_key_and_only_the_key(api):
    response = api("GET", "/ping", user=None)
    assert response.status_code == 200
    assert response.json() == {"statusCode": 200, "message": "pong"}
    assert response.headers["x-api-version"] == "1.5.0"


@pytest.mark.parametrize("path", ["/ping", "/users", "/prod/roles", "/no/such/route"])
def test_a_missing_or_wrong_key_is_forbidden_with_apigateways_body(api, path):
    for headers in ({}, {"x-api-key": "wrong"}):
        response = api.http.get(path, headers={**headers, "username": "admin"})
        assert response.status_code == 403
        assert response.content == b'{"message":"Forbidden"}'


def test_every_route_is_also_served_under_prod(api):
    assert api("GET", "/prod/ping").json()["message"] == "pong"
    assert api("GET", "/prod/users").status_code == 200
    assert api("GET", "/prod/roles").status_code == 200


def test_without_a_known_user_it_is_unauthorized(api):
    for user in (None, "nobody-here"):
        response = api("GET", "/users", user=user)
        assert response.status_code == 401
        assert response.json() == {"statusCode": 401, "message": "Unauthorized"}


def test_the_14_bearer_token_names_the_user(api):
    response = api("GET", "/users", user=None, headers={"Authorization": "Bearer 61646D696E"})
    assert response.status_code == 200


def test_admin_sees_itself_with_every_permission_and_no_password(api):
    users = api("GET", "/users", params={"username": "admin"}).json()["data"]
    assert users["last_evaluated_key"] == "not_applicable"
    (admin,) = users["users"]
    assert admin["roles"] == ["IT Operator"]
    assert admin["password"] == "********"
    assert set(admin["permissions"]) == {
        "train:all",
        "checkpoint:all",
        "inference:all",
        "sagemaker_endpoint:all",
        "user:all",
        "role:all",
    }


def test_bootstrap_roles_exist(api):
    roles = api("GET", "/roles").json()["data"]
    names = {role["role_name"] for role in roles["roles"]}
    assert {"IT Operator", "byoc"} <= names
    assert roles["previous_evaluated_key"] == "not_applicable"


def test_a_designer_role_and_user_from_creation_to_deletion(api):
    role, user = unique("Designer"), unique("dana")
    response = api(
        "POST",
        "/roles",
        json={"role_name": role, "permissions": ["inference:all", "checkpoint:list"], "creator": "admin"},
    )
    assert response.status_code == 201
    assert response.json()["message"] == "role created"
    assert response.json()["data"]["permissions"] == ["inference:all", "checkpoint:list"]

    response = api("POST", "/users", json={"username": user, "password": "pw", "roles": [role], "creator": "admin"})
    assert response.status_code == 201
    assert response.json() == {"statusCode": 201, "message": "Created"}

    # the new user acts with its role's permissions...
    me = api("GET", "/users", user=user).json()["data"]["users"]
    assert [u["username"] for u in me] == [user]  # no user:list: only itself
    assert me[0]["permissions"] == ["checkpoint:list", "inference:all"]
    # ...and nothing more
    response = api("GET", "/roles", user=user)
    assert response.status_code == 403
    assert response.json()["message"] == f"User {user} has no permissions: ['role:all', 'role:list']"
    assert api("DELETE", "/users", user=user, json={"user_name_list": ["admin"]}).status_code == 403

    assert api("DELETE", "/users", json={"user_name_list": [user, "never-existed"]}).status_code == 204
    assert api("GET", "/users", user=user).status_code == 401
    response = api("DELETE", "/roles", json={"role_name_list": [role]})
    assert response.status_code == 204
    assert response.content == b""


def test_a_permission_change_applies_at_once(api):
    role, user = unique("Auditor"), unique("audrey")
    api("POST", "/roles", json={"role_name": role, "permissions": ["role:list"]})
    api("POST", "/users", json={"username": user, "password": "pw", "roles": [role]})
    assert api("GET", "/roles", user=user).status_code == 200  # now cached by the gateway
    api("POST", "/roles", json={"role_name": role, "permissions": ["train:list"]})
    deadline = time.monotonic() + 5
    while api("GET", "/roles", user=user).status_code == 200:
        assert time.monotonic() < deadline, "the revoked permission still works"
        time.sleep(0.05)
    assert api("GET", "/roles", user=user).status_code == 403


def test_initial_user_needs_only_the_key_and_is_idempotent(api):
    user = unique("first")
    for password in ("one", "two"):
        response = api("POST", "/users", user=None, json={"username": user, "password": password, "initial": True})
        assert response.status_code == 201
    (me,) = api("GET", "/users", user=user, params={"username": user}).json()["data"]["users"]
    assert me["roles"] == ["IT Operator"]


def test_initial_role_needs_only_the_key(api):
    role = unique("Boot")
    response = api("POST", "/roles", user=None, json={"role_name": role, "permissions": ["train:all"], "initial": True})
    assert response.status_code == 201


def test_the_default_role_cannot_be_deleted(api):
    response = api("DELETE", "/roles", json={"role_name_list": ["IT Operator"]})
    assert response.status_code == 400
    assert response.json()["message"] == "cannot delete default role"


def test_unknown_role_for_a_user_is_refused(api):
    response = api("POST", "/users", json={"username": unique("u"), "password": "x", "roles": ["NoSuchRole"]})
    assert response.status_code == 400
    assert response.json()["message"] == 'user roles "NoSuchRole" not exist'


@pytest.mark.parametrize(
    "method, path, body, expected",
    [
        ("POST", "/users", {"roles": []}, 'object has missing required properties (["password","username"])'),
        ("POST", "/users", {"username": "", "password": "x"}, "required minimum: 1"),
        (
            "POST",
            "/users",
            {"username": "x", "password": "x", "roles": "IT Operator"},
            "roles: Input should be a valid list",
        ),
        ("POST", "/users", {"username": ["x"], "password": "x"}, "username: Input should be a valid string"),
        ("POST", "/roles", {"role_name": "r"}, 'object has missing required properties (["permissions"])'),
        ("POST", "/roles", {"role_name": "r", "permissions": []}, "required minimum: 1"),
        ("POST", "/roles", {"role_name": "r", "permissions": ["train:delete"]}, "unknown permissions ['train:delete']"),
        ("DELETE", "/roles", {"role_name_list": []}, "required minimum: 1"),
        ("DELETE", "/roles", {}, 'object has missing required properties (["role_name_list"])'),
        ("DELETE", "/users", {"user_name_list": [""]}, "required minimum: 1"),
        ("DELETE", "/users", {"user_name_list": ["x"] * 101}, "maximum allowed: 100"),
    ],
)
def test_bad_bodies_get_400_with_a_readable_message(api, method, path, body, expected):
    response = api(method, path, json=body)
    assert response.status_code == 400, response.text
    assert expected in response.json()["message"]


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"{not json", "request body is not valid JSON"),
        (b"[1, 2]", "request body must be a JSON object"),
        (b'"text"', "request body must be a JSON object"),
        (b"", "object has missing required properties"),
        (b"\xff\xfe", "request body is not valid JSON"),
    ],
)
def test_malformed_bodies_get_400(api, content, expected):
    response = api("POST", "/users", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert expected in response.json()["message"]


def test_a_huge_body_is_refused_without_a_crash(api):
    response = api("POST", "/users", content=b"{" + b" " * (2 * 1024 * 1024) + b"}")
    assert response.status_code == 413
    assert api("GET", "/ping").status_code == 200


def test_unknown_routes_and_methods_answer_in_the_envelope(api):
    assert api("GET", "/nothing-here").json() == {"statusCode": 404, "message": "Not Found"}
    assert api("PATCH", "/users").json() == {"statusCode": 405, "message": "Method Not Allowed"}


def test_the_openapi_document_is_served_at_api(api):
    document = api.http.get("/api").json()
    assert {"/ping", "/users", "/roles"} <= set(document["paths"])
    assert "requestBody" in document["paths"]["/users"]["post"]
