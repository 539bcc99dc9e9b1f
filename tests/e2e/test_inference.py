"""Endpoints and image generation through HTTP, over the real broker, database, storage and
worker processes running the tiny Stable-Diffusion-shaped model."""

import base64
import io
import json
import uuid

import httpx
import pytest
from PIL import Image

from deploy.local.events import EventListener
from tests.support import consumer_prefetch, wait_for

pytestmark = pytest.mark.e2e


def unique(name: str) -> str:
    return f"{uuid.uuid4().hex[:6]}-{name}"


def upload_checkpoint(api, path, checkpoint_type: str, name: str) -> str:
    data = path.read_bytes()
    created = api(
        "POST",
        "/checkpoints",
        json={"checkpoint_type": checkpoint_type, "filenames": [{"filename": name, "parts_number": 1}]},
    ).json()["data"]
    etag = httpx.put(created["s3PresignUrl"][name][0], content=data).headers["etag"]
    checkpoint_id = created["checkpoint"]["id"]
    response = api(
        "PUT",
        f"/checkpoints/{checkpoint_id}",
        json={"status": "Active", "multi_parts_tags": {name: [{"ETag": etag, "PartNumber": 1}]}},
    )
    assert response.status_code == 200, response.text
    return checkpoint_id


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, api):
    from diffusion.testing import make_tiny_checkpoint, make_tiny_lora

    folder = tmp_path_factory.mktemp("models")
    model, lora = folder / "tiny.safetensors", folder / "tiny-lora.safetensors"
    make_tiny_checkpoint(model, seed=0)
    make_tiny_lora(model, lora, seed=1)
    names = {"model": unique("tiny-sd15.safetensors"), "lora": unique("tiny-lora.safetensors")}
    upload_checkpoint(api, model, "Stable-diffusion", names["model"])
    upload_checkpoint(api, lora, "Lora", names["lora"])
    return names


def wait_endpoint(api, name: str) -> dict:
    def in_service():
        for endpoint in api("GET", "/endpoints").json()["data"]["endpoints"]:
            if endpoint["endpoint_name"] == name and endpoint["endpoint_status"] != "Creating":
                return endpoint
        return None

    endpoint = wait_for(in_service, timeout=120, what=f"endpoint {name}")
    assert endpoint["endpoint_status"] == "InService", endpoint
    return endpoint


@pytest.fixture(scope="module")
def async_endpoint(api, tiny_models):
    response = api(
        "POST",
        "/endpoints",
        json={
            "endpoint_name": unique("async")[:20],
            "endpoint_type": "Async",
            "instance_type": "cpu",
            "initial_instance_count": "1",
            "autoscaling_enabled": False,
            "assign_to_roles": ["IT Operator"],
        },
    )
    assert response.status_code == 202, response.text
    name = response.json()["data"]["endpoint_name"]
    assert response.json()["message"] == f"Endpoint deployment started: {name}"
    assert response.json()["data"]["endpoint_status"] == "Creating"
    wait_endpoint(api, name)
    yield name
    api("DELETE", "/endpoints", json={"endpoint_name_list": [name]})


def payload(**overrides) -> dict:
    body = {
        "prompt": "a tiny red cube",
        "negative_prompt": "",
        "steps": 4,
        "sampler_name": "Euler a",
        "cfg_scale": 7,
        "width": 64,
        "height": 64,
        "seed": 1234,
        "batch_size": 1,
        "n_iter": 1,
    }
    body.update(overrides)
    return body


def run_async(api, endpoint: str, models: dict, body: dict, task: str = "txt2img") -> dict:
    created = api(
        "POST",
        "/inferences",
        json={"task_type": task, "inference_type": "Async", "models": models, "sagemaker_endpoint_name": endpoint},
    )
    assert created.status_code == 201, created.text
    inference = created.json()["data"]["inference"]
    assert httpx.put(inference["api_params_s3_upload_url"], content=json.dumps(body).encode()).status_code == 200
    started = api("PUT", f"/inferences/{inference['id']}/start")
    assert started.status_code == 202, started.text
    assert started.json()["data"]["inference"]["status"] == "inprogress"
    return wait_for(
        lambda: (
            (job := api("GET", f"/inferences/{inference['id']}").json()["data"])["status"] in ("succeed", "failed")
            and job
        ),
        timeout=120,
        what="the job",
    )


def images_of(job: dict) -> list[Image.Image]:
    return [Image.open(io.BytesIO(httpx.get(url).content)) for url in job["img_presigned_urls"]]


def test_every_worker_takes_one_job_at_a_time(stack, async_endpoint):
    prefix = stack.env["ESD_BROKER_PREFIX"]
    assert consumer_prefetch(f"{prefix}inference.{async_endpoint}") == [1]
    assert consumer_prefetch(f"{prefix}training.jobs") == [1]  # the stack's training worker


def test_async_txt2img_reports_batch_size_images_of_the_requested_size(api, async_endpoint, tiny_models):
    job = run_async(
        api,
        async_endpoint,
        {"Stable-diffusion": [tiny_models["model"]], "VAE": ["Automatic"]},
        payload(batch_size=2, width=64, height=96),
    )
    assert job["status"] == "succeed", job.get("error")
    assert job["image_names"] == ["image_0.png", "image_1.png"]
    images = images_of(job)
    assert [image.size for image in images] == [(64, 96), (64, 96)]
    assert "Steps: 4" in images[0].info["parameters"]
    record = httpx.get(job["output_presigned_urls"][0]).json()
    assert record["info"]["all_seeds"] == [1234, 1235]


def test_the_same_seed_gives_the_same_image(api, async_endpoint, tiny_models):
    models = {"Stable-diffusion": [tiny_models["model"]]}
    first = run_async(api, async_endpoint, models, payload(seed=77))
    again = run_async(api, async_endpoint, models, payload(seed=77))
    other = run_async(api, async_endpoint, models, payload(seed=78))
    pixels = [images_of(job)[0].tobytes() for job in (first, again, other)]
    assert pixels[0] == pixels[1]
    assert pixels[0] != pixels[2]


def test_a_lora_changes_the_output(api, async_endpoint, tiny_models):
    plain = {"Stable-diffusion": [tiny_models["model"]]}
    with_lora = {**plain, "Lora": [tiny_models["lora"]]}
    stem = tiny_models["lora"].removesuffix(".safetensors")
    without = run_async(api, async_endpoint, plain, payload(seed=5))
    lora = run_async(api, async_endpoint, with_lora, payload(seed=5, prompt=f"a tiny red cube <lora:{stem}:1>"))
    assert lora["status"] == "succeed", lora.get("error")
    assert images_of(without)[0].tobytes() != images_of(lora)[0].tobytes()


def test_img2img_starts_from_the_given_image(api, async_endpoint, tiny_models):
    source = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(source, format="PNG")
    body = payload(init_images=[base64.b64encode(source.getvalue()).decode()], denoising_strength=0.5)
    job = run_async(api, async_endpoint, {"Stable-diffusion": [tiny_models["model"]]}, body, task="img2img")
    assert job["status"] == "succeed", job.get("error")
    assert images_of(job)[0].size == (64, 64)


@pytest.mark.parametrize(
    "body, task, reason",
    [
        (payload(width=100), "txt2img", "width"),
        (payload(sampler_name="Warp Drive"), "txt2img", "Warp Drive"),
        ({"prompt": "x", "steps": "many"}, "txt2img", "steps"),
    ],
)
def test_a_bad_payload_fails_the_job_with_the_reason(api, async_endpoint, tiny_models, body, task, reason):
    job = run_async(api, async_endpoint, {"Stable-diffusion": [tiny_models["model"]]}, body, task=task)
    assert job["status"] == "failed"
    assert reason in job["error"]


def test_an_extras_payload_without_its_image_fails_clearly(api, async_endpoint, tiny_models):
    # every task type runs now (tests/e2e/test_extras.py); a body that is not the task's fails
    job = run_async(api, async_endpoint, {}, {"image": ""}, task="rembg")
    assert job["status"] == "failed"
    assert "invalid rembg payload: input_image: the rembg payload needs it" in job["error"]


def test_payload_may_carry_infinity(api, async_endpoint, tiny_models):
    created = api(
        "POST",
        "/inferences",
        json={
            "task_type": "txt2img",
            "inference_type": "Async",
            "models": {"Stable-diffusion": [tiny_models["model"]]},
            "sagemaker_endpoint_name": async_endpoint,
        },
    )
    inference = created.json()["data"]["inference"]
    text = json.dumps(payload()).replace("}", ', "s_tmax": Infinity}')
    httpx.put(inference["api_params_s3_upload_url"], content=text.encode())
    api("PUT", f"/inferences/{inference['id']}/start")
    job = wait_for(
        lambda: (
            (j := api("GET", f"/inferences/{inference['id']}").json()["data"])["status"] in ("succeed", "failed") and j
        ),
        timeout=120,
    )
    assert job["status"] == "succeed", job.get("error")


def test_one_api_async_answers_202_and_finishes(api, async_endpoint, tiny_models):
    response = api(
        "POST",
        "/inferences",
        json={
            "task_type": "txt2img",
            "inference_type": "Async",
            "models": {"Stable-diffusion": [tiny_models["model"]]},
            "sagemaker_endpoint_name": async_endpoint,
            "payload_string": json.dumps(payload()),
        },
    )
    assert response.status_code == 202, response.text
    inference_id = response.json()["data"]["inference"]["inference_id"]
    job = wait_for(
        lambda: (j := api("GET", f"/inferences/{inference_id}").json()["data"])["status"] == "succeed" and j,
        timeout=120,
    )
    assert len(job["img_presigned_urls"]) == 1


def test_a_client_bound_to_the_events_sees_started_progress_and_succeeded(api, stack, async_endpoint, tiny_models):
    created = api(
        "POST",
        "/inferences",
        json={
            "task_type": "txt2img",
            "inference_type": "Async",
            "models": {"Stable-diffusion": [tiny_models["model"]]},
            "sagemaker_endpoint_name": async_endpoint,
        },
    )
    inference = created.json()["data"]["inference"]
    httpx.put(inference["api_params_s3_upload_url"], content=json.dumps(payload(steps=6)).encode())
    exchange = f"{stack.env['ESD_BROKER_PREFIX']}esd.events"
    with EventListener(stack.amqp_url, exchange, "inference.#") as events:
        api("PUT", f"/inferences/{inference['id']}/start")
        seen = events.until(lambda key, body: key == "inference.succeeded" and body["inference_id"] == inference["id"])
    keys = [key for key, body in seen if body.get("inference_id") == inference["id"]]
    assert keys[0] == "inference.started"
    assert "inference.progress" in keys
    assert keys[-1] == "inference.succeeded"


def create_endpoint(api, **body) -> str:
    defaults = {
        "endpoint_name": unique("ep")[:20],
        "endpoint_type": "Async",
        "instance_type": "cpu",
        "initial_instance_count": 1,
        "autoscaling_enabled": False,
        "assign_to_roles": ["IT Operator"],
    }
    response = api("POST", "/endpoints", json={**defaults, **body})
    assert response.status_code == 202, response.text
    return response.json()["data"]["endpoint_name"]


def test_real_time_txt2img_answers_200_with_the_images(api, tiny_models):
    name = create_endpoint(api, endpoint_type="Real-time")
    assert name.startswith("esd-real-time-")
    try:
        wait_endpoint(api, name)
        created = api(
            "POST",
            "/inferences",
            json={
                "task_type": "txt2img",
                "inference_type": "Real-time",
                "models": {"Stable-diffusion": [tiny_models["model"]]},
            },
        )
        inference = created.json()["data"]["inference"]
        httpx.put(inference["api_params_s3_upload_url"], content=json.dumps(payload()).encode())
        response = api("PUT", f"/inferences/{inference['id']}/start")
        assert response.status_code == 200, response.text
        job = response.json()["data"]
        assert job["status"] == "succeed"
        assert job["inference_type"] == "Real-time"
        assert images_of(job)[0].size == (64, 64)
        # the one API, Real-time: 200 with the finished job in one call
        response = api(
            "POST",
            "/inferences",
            json={
                "task_type": "txt2img",
                "inference_type": "Real-time",
                "models": {"Stable-diffusion": [tiny_models["model"]]},
                "payload_string": json.dumps(payload(seed=3)),
            },
        )
        assert response.status_code == 200, response.text
        assert response.json()["data"]["status"] == "succeed"
    finally:
        api("DELETE", "/endpoints", json={"endpoint_name_list": [name]})


def worker_pids(endpoint: str) -> list[int]:
    import subprocess

    found = subprocess.run(
        ["pgrep", "-f", f"services.inference.worker --endpoint {endpoint} "], capture_output=True, text=True
    )
    return [int(pid) for pid in found.stdout.split()]


def test_a_worker_killed_mid_job_loses_nothing(api, tiny_models):
    import os
    import signal

    name = create_endpoint(api)
    try:
        wait_endpoint(api, name)
        created = api(
            "POST",
            "/inferences",
            json={
                "task_type": "txt2img",
                "inference_type": "Async",
                "models": {"Stable-diffusion": [tiny_models["model"]]},
                "sagemaker_endpoint_name": name,
            },
        )
        inference = created.json()["data"]["inference"]
        httpx.put(
            inference["api_params_s3_upload_url"],
            content=json.dumps(payload(steps=150, width=256, height=256, seed=9)).encode(),
        )
        api("PUT", f"/inferences/{inference['id']}/start")
        wait_for(
            lambda: api("GET", f"/inferences/{inference['id']}").json()["data"].get("progress"),
            timeout=120,
            what="the job to be running",
        )
        (victim,) = worker_pids(name)
        os.kill(victim, signal.SIGKILL)
        job = wait_for(
            lambda: (
                (j := api("GET", f"/inferences/{inference['id']}").json()["data"])["status"] in ("succeed", "failed")
                and j
            ),
            timeout=300,
            what="the redelivered job",
        )
        assert job["status"] == "succeed", job.get("error")
        assert job["image_names"] == ["image_0.png"]
        assert victim not in worker_pids(name)  # the pool replaced the dead worker
    finally:
        api("DELETE", "/endpoints", json={"endpoint_name_list": [name]})


def test_an_async_pool_at_zero_starts_a_worker_when_work_arrives(api, tiny_models):
    name = create_endpoint(api, autoscaling_enabled=True, min_instance_number=0, max_instance_number=1)
    try:
        wait_endpoint(api, name)

        def listed():
            return next(e for e in api("GET", "/endpoints").json()["data"]["endpoints"] if e["endpoint_name"] == name)

        wait_for(
            lambda: listed()["current_instance_count"] == "0" and not worker_pids(name),
            timeout=60,
            what="the pool to scale to zero",
        )
        job = run_async(api, name, {"Stable-diffusion": [tiny_models["model"]]}, payload())
        assert job["status"] == "succeed", job.get("error")
    finally:
        api("DELETE", "/endpoints", json={"endpoint_name_list": [name]})


def test_endpoint_listing_shows_the_live_instance_count(api, async_endpoint):
    (endpoint,) = [
        e for e in api("GET", "/endpoints").json()["data"]["endpoints"] if e["endpoint_name"] == async_endpoint
    ]
    assert endpoint["current_instance_count"] == "1"
    assert endpoint["endpoint_type"] == "Async"
    assert endpoint["owner_group_or_role"] == ["IT Operator"]


@pytest.mark.parametrize(
    "body, expected",
    [
        (
            {"endpoint_type": "Async"},
            'object has missing required properties (["assign_to_roles","initial_instance_count","instance_type"])',
        ),
        (
            {"endpoint_type": "Batch", "instance_type": "x", "initial_instance_count": 1, "assign_to_roles": ["a"]},
            "endpoint_type: Input should be",
        ),
        (
            {"endpoint_type": "Async", "instance_type": "x", "initial_instance_count": 0, "assign_to_roles": ["a"]},
            "initial_instance_count",
        ),
        (
            {"endpoint_type": "Async", "instance_type": "x", "initial_instance_count": "two", "assign_to_roles": ["a"]},
            "initial_instance_count",
        ),
        (
            {"endpoint_type": "Async", "instance_type": "x", "initial_instance_count": 1, "assign_to_roles": []},
            "required minimum: 1",
        ),
        (
            {
                "endpoint_type": "Async",
                "instance_type": "x",
                "initial_instance_count": 1,
                "assign_to_roles": ["a"],
                "endpoint_name": "x" * 21,
            },
            "endpoint_name",
        ),
        (
            {
                "endpoint_type": "Real-time",
                "instance_type": "x",
                "initial_instance_count": 1,
                "assign_to_roles": ["a"],
                "autoscaling_enabled": True,
                "min_instance_number": 0,
            },
            "needs min_instance_number >= 1",
        ),
    ],
)
def test_bad_endpoint_bodies_get_400(api, body, expected):
    response = api("POST", "/endpoints", json=body)
    assert response.status_code == 400, response.text
    assert expected in response.json()["message"]


def test_the_same_endpoint_name_twice_is_refused(api, async_endpoint):
    short = async_endpoint.removeprefix("esd-async-")
    response = api(
        "POST",
        "/endpoints",
        json={
            "endpoint_name": short,
            "endpoint_type": "Async",
            "instance_type": "cpu",
            "initial_instance_count": 1,
            "assign_to_roles": ["IT Operator"],
        },
    )
    assert (response.status_code, response.json()["message"]) == (400, "Cannot create already existing model")


def test_inference_rules(api, async_endpoint, tiny_models):
    response = api("POST", "/inferences", json={"task_type": "paint", "inference_type": "Async", "models": {}})
    assert (
        response.json()["message"]
        == "task type paint should be in ['extra-single-image', 'extra-batch-images', 'rembg'] or ['txt2img', 'img2img']"
    )
    response = api(
        "POST",
        "/inferences",
        json={
            "task_type": "txt2img",
            "inference_type": "Async",
            "models": {"Stable-diffusion": ["nope.safetensors"], "Lora": ["gone.safetensors"]},
        },
    )
    assert (
        response.json()["message"]
        == "checkpoint with name nope.safetensors, type Stable-diffusion is not found checkpoint with name gone.safetensors, type Lora is not found"
    )
    response = api(
        "POST",
        "/inferences",
        json={
            "task_type": "txt2img",
            "inference_type": "Async",
            "models": {"Stable-diffusion": [tiny_models["model"]]},
            "payload_string": "{not json",
        },
    )
    assert response.json()["message"] == "payload_string must be valid json string"
    stranger = unique("stranger")
    api("POST", "/roles", json={"role_name": stranger, "permissions": ["inference:all"]})
    api("POST", "/users", json={"username": stranger, "password": "pw", "roles": [stranger]})
    response = api(
        "POST",
        "/inferences",
        user=stranger,
        json={
            "task_type": "txt2img",
            "inference_type": "Async",
            "models": {"Stable-diffusion": [tiny_models["model"]]},
        },
    )
    assert response.json()["message"] == f'no available Async endpoints for user "{stranger}"'
    assert api("PUT", "/inferences/no-such-job/start").json() == {
        "statusCode": 400,
        "message": "InferenceJobId no-such-job not found",
    }
    assert api("GET", "/inferences/no-such-job").json() == {
        "statusCode": 404,
        "message": "inference with id no-such-job not found",
    }
    created = api(
        "POST",
        "/inferences",
        json={
            "task_type": "txt2img",
            "inference_type": "Async",
            "models": {"Stable-diffusion": [tiny_models["model"]]},
        },
    ).json()["data"]["inference"]
    response = api("PUT", f"/inferences/{created['id']}/start")
    assert response.status_code == 400
    assert "api_param.json has not been uploaded" in response.json()["message"]


def test_listing_and_deleting_inferences(api, async_endpoint, tiny_models):
    job = run_async(api, async_endpoint, {"Stable-diffusion": [tiny_models["model"]]}, payload())
    page = api("GET", "/inferences", params={"limit": 2}).json()["data"]
    assert len(page["inferences"]) <= 2
    if page["last_evaluated_key"]:
        more = api("GET", "/inferences", params={"limit": 2, "exclusive_start_key": page["last_evaluated_key"]}).json()[
            "data"
        ]
        assert {j["InferenceJobId"] for j in more["inferences"]}.isdisjoint(
            {j["InferenceJobId"] for j in page["inferences"]}
        )
    assert (
        api("DELETE", "/inferences", json={"inference_id_list": [job["InferenceJobId"], "unknown"]}).status_code == 204
    )
    assert api("GET", f"/inferences/{job['InferenceJobId']}").status_code == 404
