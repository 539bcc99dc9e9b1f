"""Job control through HTTP: cancel a queued and a running job, stop a training, follow a job
with Server-Sent Events (each step, then the end; resumed with Last-Event-ID)."""

import json
import threading
import time
import uuid

import httpx
import pytest

from tests.e2e.test_inference import payload, tiny_models, unique, upload_checkpoint, wait_endpoint  # noqa: F401
from tests.support import wait_for

pytestmark = pytest.mark.e2e


def sse_events(response: httpx.Response):
    """(id, event, data) of each Server-Sent Event of a streaming response."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if not line:
            if "data" in fields:
                yield int(fields.get("id", "-1")), fields.get("event", ""), json.loads(fields["data"])
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value


class Follower(threading.Thread):
    """A client following one job's event stream in the background."""

    def __init__(self, api, inference_id: str, last_event_id: int | None = None) -> None:
        super().__init__(daemon=True)
        self.api, self.inference_id, self.last_event_id = api, inference_id, last_event_id
        self.events: list[tuple[int, str, dict]] = []
        self.status: int | None = None

    def run(self) -> None:
        headers = {"x-api-key": self.api.key, "username": "admin"}
        if self.last_event_id is not None:
            headers["last-event-id"] = str(self.last_event_id)
        with httpx.stream(
            "GET",
            f"{str(self.api.http.base_url).rstrip('/')}/inferences/{self.inference_id}/events",
            headers=headers,
            timeout=120,
        ) as response:
            self.status = response.status_code
            for event in sse_events(response):
                self.events.append(event)

    def steps(self) -> list[int]:
        return [data["step"] for _, kind, data in self.events if kind == "inference.progress"]


@pytest.fixture(scope="module")
def slow_endpoint(api, tiny_models):  # noqa: F811
    """One worker: jobs queue behind each other."""
    response = api(
        "POST",
        "/endpoints",
        json={
            "endpoint_name": unique("ctl")[:20],
            "endpoint_type": "Async",
            "instance_type": "cpu",
            "initial_instance_count": 1,
            "assign_to_roles": ["IT Operator"],
        },
    )
    name = response.json()["data"]["endpoint_name"]
    wait_endpoint(api, name)
    yield name
    api("DELETE", "/endpoints", json={"endpoint_name_list": [name]})


def submit(api, endpoint: str, model: str, body: dict) -> str:
    response = api(
        "POST",
        "/inferences",
        json={
            "task_type": "txt2img",
            "inference_type": "Async",
            "models": {"Stable-diffusion": [model]},
            "sagemaker_endpoint_name": endpoint,
            "payload_string": json.dumps(body),
        },
    )
    assert response.status_code == 202, response.text
    return response.json()["data"]["inference"]["inference_id"]


def finished(api, inference_id: str) -> dict:
    return wait_for(
        lambda: (
            (j := api("GET", f"/inferences/{inference_id}").json()["data"])["status"]
            in ("succeed", "failed", "canceled")
            and j
        ),
        timeout=180,
        what=f"job {inference_id} to end",
    )


def test_an_sse_client_sees_each_step_and_the_end(api, slow_endpoint, tiny_models):  # noqa: F811
    inference_id = submit(api, slow_endpoint, tiny_models["model"], payload(steps=6))
    follower = Follower(api, inference_id)
    follower.start()
    follower.join(180)
    assert follower.status == 200
    kinds = [kind for _, kind, _ in follower.events]
    assert kinds[:2] == ["inference.created", "inference.started"] and kinds[-1] == "inference.succeeded", kinds
    assert follower.steps() == [1, 2, 3, 4, 5, 6]
    ids = [offset for offset, _, _ in follower.events]
    assert ids == sorted(ids)

    # resumed after the third event: the rest, and nothing of before
    resumed = Follower(api, inference_id, last_event_id=ids[2])
    resumed.start()
    resumed.join(60)
    assert [offset for offset, _, _ in resumed.events] == ids[3:]


def test_cancel_a_queued_and_a_running_job(api, slow_endpoint, tiny_models):  # noqa: F811
    # a long job keeps the only worker busy; the one behind it waits in the queue
    running = submit(api, slow_endpoint, tiny_models["model"], payload(steps=60, width=256, height=256))
    queued = submit(api, slow_endpoint, tiny_models["model"], payload(steps=2))
    # every progress event of the long job, as it comes, also after the job was canceled
    steps: list[int] = []
    watcher = threading.Thread(target=watch_progress, args=(api, running, steps), daemon=True)
    watcher.start()
    wait_for(lambda: len(steps) >= 3, timeout=120, what="the long job to be running")

    assert api("PUT", f"/inferences/{queued}/cancel").json()["data"]["status"] == "canceled"
    response = api("PUT", f"/inferences/{running}/cancel")
    seen_when_canceled = max(steps)
    assert response.status_code == 200, response.text
    assert response.json()["data"]["status"] == "canceled"
    time.sleep(4)  # enough for many more steps, had the worker gone on
    assert max(steps) <= seen_when_canceled + 2, steps  # it stopped within two steps
    assert max(steps) < 60
    assert finished(api, running)["status"] == "canceled"
    job = finished(api, queued)
    assert job["status"] == "canceled" and job["image_names"] == []

    # the worker is free again, and a finished job cannot be canceled
    after = submit(api, slow_endpoint, tiny_models["model"], payload(steps=2))
    assert finished(api, after)["status"] == "succeed"
    again = api("PUT", f"/inferences/{after}/cancel")
    assert again.status_code == 400 and "already succeed" in again.json()["message"]
    assert api("PUT", f"/inferences/{uuid.uuid4()}/cancel").status_code == 404


def watch_progress(api, inference_id: str, steps: list[int]) -> None:
    headers = {"x-api-key": api.key, "username": "admin"}
    url = f"{str(api.http.base_url).rstrip('/')}/events"
    try:
        with httpx.stream("GET", url, params={"type": "inference.progress"}, headers=headers, timeout=60) as response:
            for _, _, data in sse_events(response):
                if data["inference_id"] == inference_id:
                    steps.append(data["step"])
    except httpx.HTTPError:  # the stack went away at the end of the run
        pass


def test_another_users_job_cannot_be_canceled(api, slow_endpoint, tiny_models):  # noqa: F811
    user = unique("other")
    api("POST", "/roles", json={"role_name": user, "permissions": ["inference:create"]})
    api("POST", "/users", json={"username": user, "password": "pw", "roles": [user]})
    inference_id = submit(api, slow_endpoint, tiny_models["model"], payload(steps=2))
    assert api("PUT", f"/inferences/{inference_id}/cancel", user=user).status_code == 404
    finished(api, inference_id)


def test_events_stream_shows_a_user_only_its_own_jobs(api, slow_endpoint, tiny_models):  # noqa: F811
    user = unique("watcher")
    api("POST", "/roles", json={"role_name": user, "permissions": ["inference:list"]})
    api("POST", "/users", json={"username": user, "password": "pw", "roles": [user]})
    seen: dict[str, list[tuple[str, dict]]] = {"admin": [], user: []}

    def watch(name: str) -> None:
        headers = {"x-api-key": api.key, "username": name}
        try:
            follow(name, headers)
        except httpx.HTTPError:  # the stack went away at the end of the run
            pass

    def follow(name: str, headers: dict) -> None:
        with httpx.stream(
            "GET",
            f"{str(api.http.base_url).rstrip('/')}/events",
            params={"type": "inference.*"},
            headers=headers,
            timeout=60,
        ) as response:
            for _, kind, data in sse_events(response):
                seen[name].append((kind, data))
                if kind == "inference.succeeded":
                    return

    watchers = [threading.Thread(target=watch, args=(name,), daemon=True) for name in seen]
    for watcher in watchers:
        watcher.start()
    time.sleep(1)
    inference_id = submit(api, slow_endpoint, tiny_models["model"], payload(steps=2))
    watchers[0].join(120)
    assert any(kind == "inference.succeeded" and data["inference_id"] == inference_id for kind, data in seen["admin"])
    assert all(data.get("owner") == user for _, data in seen[user])  # nothing of admin's job
