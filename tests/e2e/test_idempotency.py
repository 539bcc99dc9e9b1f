"""Idempotent creation: a POST repeated with the same Idempotency-Key creates once."""

import json
import threading
import uuid

import pytest

from tests.e2e.test_inference import async_endpoint, payload, tiny_models, unique  # noqa: F401

pytestmark = pytest.mark.e2e


def test_a_repeated_inference_post_creates_one_job(api, async_endpoint, tiny_models):  # noqa: F811
    key = str(uuid.uuid4())
    body = {
        "task_type": "txt2img",
        "inference_type": "Async",
        "models": {"Stable-diffusion": [tiny_models["model"]]},
        "sagemaker_endpoint_name": async_endpoint,
        "payload_string": json.dumps(payload(steps=2)),
    }
    before = len(api("GET", "/inferences", params={"limit": 100}).json()["data"]["inferences"])
    first = api("POST", "/inferences", json=body, headers={"Idempotency-Key": key})
    again = api("POST", "/inferences", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == again.status_code == 202, (first.text, again.text)
    assert again.json()["data"]["inference"]["inference_id"] == first.json()["data"]["inference"]["inference_id"]
    after = len(api("GET", "/inferences", params={"limit": 100}).json()["data"]["inferences"])
    assert after == before + 1

    other = api("POST", "/inferences", json={**body, "payload_string": "{}"}, headers={"Idempotency-Key": key})
    assert other.status_code == 422 and "Idempotency-Key" in other.json()["message"]
    # without a key, or with another one, it is a new job
    fresh = api("POST", "/inferences", json=body, headers={"Idempotency-Key": str(uuid.uuid4())})
    assert fresh.json()["data"]["inference"]["inference_id"] != first.json()["data"]["inference"]["inference_id"]


def test_repeats_sent_at_once_create_one_user_and_role(api):
    key, name = str(uuid.uuid4()), unique("twin")
    answers: list[int] = []

    def create() -> None:
        response = api(
            "POST", "/users", json={"username": name, "password": "pw", "roles": []}, headers={"Idempotency-Key": key}
        )
        answers.append(response.status_code)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [201] * 4
    users = api("GET", "/users", params={"username": name}).json()["data"]["users"]
    assert [user["username"] for user in users] == [name]

    role = {"role_name": unique("role"), "permissions": ["inference:list"]}
    replies = [api("POST", "/roles", json=role, headers={"Idempotency-Key": key}).json() for _ in range(2)]
    assert replies[0] == replies[1]  # another command: the same key is free for it


def test_a_checkpoint_upload_repeated_gets_the_same_checkpoint(api):
    key = str(uuid.uuid4())
    body = {"checkpoint_type": "Lora", "filenames": [{"filename": unique("same.safetensors"), "parts_number": 1}]}
    first = api("POST", "/checkpoints", json=body, headers={"Idempotency-Key": key}).json()["data"]
    again = api("POST", "/checkpoints", json=body, headers={"Idempotency-Key": key}).json()["data"]
    assert again["checkpoint"]["id"] == first["checkpoint"]["id"]
    assert api("POST", "/checkpoints", json=body).status_code == 400  # the file name is taken: by the first
