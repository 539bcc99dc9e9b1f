"""The OpenAPI document at /api says what the API does: schemathesis sends requests generated
from it (its examples, boundary values and random ones) to a stack of its own and checks that
no answer is a server error, every status code and body is the documented one, and a request
the document calls valid is refused only for a reason the document cannot state (a name taken,
a model that does not exist, a job in another state...).

It runs twice: as the admin, and as a user of a role with a few permissions, whose calls are
mostly refused (403, documented on every route) and must never be a server error.

The stack runs no workers (`ESD_LOCAL_MAX_WORKERS=0`): the generated endpoints would otherwise
start real ones. The event streams (`/events`) are left to their own tests: they never end."""

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.e2e.conftest import Api, make_stack

# Rejections of valid-looking requests that depend on data or state, not on the request's shape.
DOMAIN_REASONS = [
    r'user: ".*" not exist',
    r'user roles ".*" not exist',
    r"already exists",
    r"is given twice",
    r"content names a file twice",
    r"min_instance_number \d+ is above max_instance_number \d+",
    r"a Real-time endpoint with autoscaling needs min_instance_number >= 1",
    r"no available .* endpoints for user",
    r"endpoint .* (not found|no longer exists|is \w+, not \S+)",
    r"checkpoint with name .*, type .* is not found",
    r"checkpoint not found with id",
    r"InferenceJobId .* not found",
    r"models must name a Stable-diffusion checkpoint",
    r"payload_string must be valid json string",
    r"api_param\.json has not been uploaded yet",
    r"dataset .* is (not found|not Enabled yet)",
    r"files not uploaded yet",
    r"s3_(model|data)_path .* (does not exist|holds no files|is not an Active Stable-diffusion checkpoint)",
    r"s3_data_path .* is not in a dataset",
    r"is not a path in this platform's bucket|is not an s3:// location|is not a valid s3:// location",
    r"only active can update name|only an uploaded checkpoint can be disabled|is still downloading",
    r"multi parts tags (is empty|are missing|name files)|has no multipart upload|could not complete the upload",
    r"cannot tell a file name from|is not a model file",
    r"cannot delete default role",
    r"resolves to the internal address|the name does not resolve",  # what a URL's host is, by DNS
    r"is longer than \d+ bytes",  # a name's length in UTF-8 bytes, which JSON Schema cannot state
]

FAILURE = re.compile(r"^- (?P<title>.+)$", re.M)
ANSWER = re.compile(
    r"^\[(?P<status>\d+)\][^\n]*\n\n\s+`(?P<body>.*)`\n\nReproduce with:\n\n\s+(?P<curl>curl[^\n]*)$", re.M
)
SENT = re.compile(r" -d (?:'(?P<quoted>(?:[^']|'\\'')*)'|(?P<bare>\S+))")


def sent_an_object(curl: str) -> bool:
    """Whether a reproduced request's body (if any) is a JSON object: schemathesis counts as
    "schema-valid" some requests whose body is not (a scalar next to a generated header)."""
    found = SENT.search(curl)
    if found is None:
        return True
    try:
        return isinstance(json.loads(found.group("quoted") or found.group("bare")), dict)
    except ValueError:
        return False


@pytest.fixture(scope="module")
def fuzzed_stack(tmp_path_factory):
    stack = make_stack(tmp_path_factory.mktemp("openapi-stack"))
    stack.base_env.update({"ESD_LOCAL_MAX_WORKERS": "0", "ESD_TRAINING_WORKERS": "0"})
    stack.up()
    api = Api(stack)
    role = api("POST", "/roles", json={"role_name": "Limited", "permissions": ["inference:create", "checkpoint:list"]})
    assert role.status_code == 201, role.text
    user = api("POST", "/users", json={"username": "limited", "password": "limited-pw", "roles": ["Limited"]})
    assert user.status_code == 201, user.text
    yield stack
    stack.down()


# who calls, and how many examples per operation: CI's bound on the run's length
CALLERS = [("admin", 25), ("limited", 10)]


@pytest.mark.parametrize(("username", "examples"), CALLERS, ids=[user for user, _ in CALLERS])
def test_the_api_answers_as_its_document_says(fuzzed_stack, tmp_path, username, examples):
    schemathesis = Path(sys.executable).with_name("st")
    run = subprocess.run(
        [
            str(schemathesis),
            "run",
            f"{fuzzed_stack.gateway_url}/api",
            "-H",
            f"x-api-key: {fuzzed_stack.api_key}",
            "-H",
            f"username: {username}",
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,"
            "response_schema_conformance,positive_data_acceptance",
            "--phases",
            "examples,coverage,fuzzing",
            # the Server-Sent Events streams never end by themselves (tests/e2e/test_job_control.py)
            "--exclude-path-regex",
            "/events$",
            "--max-examples",
            str(examples),
            "--generation-deterministic",
            "--seed",
            str(uuid.UUID("00000000-0000-0000-0000-0000000000e5").int),
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    output = run.stdout + run.stderr
    assert "generated" in output, output[-3000:]
    titles = set(FAILURE.findall(output.split("SUMMARY")[0]))
    assert titles <= {"ST202 Schema-valid request rejected"}, output[-6000:]
    refused = [
        json.loads(answer.group("body"))["message"]
        for answer in ANSWER.finditer(output)
        if answer.group("status") == "400" and sent_an_object(answer.group("curl"))
    ]
    for message in refused:
        assert any(re.search(reason, message) for reason in DOMAIN_REASONS), (
            f"refused for a reason the document could state: {message}"
        )
