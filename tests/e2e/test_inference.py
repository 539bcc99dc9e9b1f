"""Endpoints and image generation through HTTP, over the real broker, database, storage and
worker processes running the tiny Stable-Diffusion-shaped model."""

import base64
import io
import json
import time
import uuid

import httpx
import pytest
from PIL import Image

from tests.support import EventListener, wait_for

pytestmark = pytest.mark.e2e


def unique(name: str) -> str:
    return f"{uuid.uuid4().hex[:6]}-{name}"


def upload_checkpoint(api, path, checkpoint_type: str, name: str) -> str:
    data = path.read_bytes()
    created = api("POST", "/checkpoints", json={"checkpoint_type": checkpoint_type, "filenames": [{"filename": name, "parts_number": 1}]}).json()["data"]
    etag = httpx.put(created["s3PresignUrl"][name][0], content=data).headers["etag"]
    checkpoint_id = created["checkpoint"]["id"]
    response = api("PUT", f"/checkpoints/{checkpoint_id}", json={"status": "Active", "multi_parts_tags": {name: [{"ETag": etag, "PartNumber": 1}]}})
    assert response.status_code == 200, response.text
    return checkpoint_id


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, api):
    from services.inference.worker.engine.tiny import make_tiny_checkpoint, make_tiny_lora

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
    response = api("POST", "/endpoints", json={
        "endpoint_name": unique("async")[:20], "endpoint_type": "Async", "instance_type": "cpu",
        "initial_instance_count": "1", "autoscaling_enabled": False, "assign_to_roles": ["IT Operator"],
    })
    assert response.status_code == 202, response.text
    name = response.json()["data"]["endpoint_name"]
    assert response.json()["message"] == f"Endpoint deployment started: {name}"
    assert response.json()["data"]["endpoint_status"] == "Creating"
    wait_endpoint(api, name)
    yield name
    api("DELETE", "/endpoints", json={"endpoint_name_list": [name]})


def payload(**overrides) -> dict:
    body = {"prompt": "a tiny red cube", "negative_prompt": "", "steps": 4, "sampler_name": "Euler a",
            "cfg_scale": 7, "width": 64, "height": 64, "seed": 1234, "batch_size": 1, "n_iter": 1}
    body.update(overrides)
    return body


def run_async(api, endpoint: str, models: dict, body: dict, task: str = "txt2img") -> dict:
    created = api("POST", "/inferences", json={"task_type": task, "inference_type": "Async", "models": models, "sagemaker_endpoint_name": endpoint})
    assert created.status_code == 201, created.text
    inference = created.json()["data"]["inference"]
    assert httpx.put(inference["api_params_s3_upload_url"], content=json.dumps(body).encode()).status_code == 200
    started = api("PUT", f"/inferences/{inference['id']}/start")
    assert started.status_code == 202, started.text
    assert started.json()["data"]["inference"]["status"] == "inprogress"
    return wait_for(
        lambda: (job := api("GET", f"/inferences/{inference['id']}").json()["data"])["status"] in ("succeed", "failed") and job,
        timeout=120, what="the job",
    )


def images_of(job: dict) -> list[Image.Image]:
    return [Image.open(io.BytesIO(httpx.get(url).content)) for url in job["img_presigned_urls"]]


def test_async_txt2img_reports_batch_size_images_of_the_requested_size(api, async_endpoint, tiny_models):
    job = run_async(api, async_endpoint, {"Stable-diffusion": [tiny_models["model"]], "VAE": ["Automatic"]}, payload(batch_size=2, width=64, height=96))
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


def test_a_task_the_workers_cannot_run_fails_clearly(api, async_endpoint, tiny_models):
    job = run_async(api, async_endpoint, {}, {"image": ""}, task="rembg")
    assert job["status"] == "failed"
    assert "rembg is not supported" in job["error"]


def test_payload_may_carry_infinity(api, async_endpoint, tiny_models):
    created = api("POST", "/inferences", json={"task_type": "txt2img", "inference_type": "Async", "models": {"Stable-diffusion": [tiny_models["model"]]}, "sagemaker_endpoint_name": async_endpoint})
    inference = created.json()["data"]["inference"]
    text = json.dumps(payload()).replace("}", ', "s_tmax": Infinity}')
    httpx.put(inference["api_params_s3_upload_url"], content=text.encode())
    api("PUT", f"/inferences/{inference['id']}/start")
    job = wait_for(lambda: (j := api("GET", f"/inferences/{inference['id']}").json()["data"])["status"] in ("succeed", "failed") and j, timeout=120)
    assert job["status"] == "succeed", job.get("error")


def test_one_api_async_answers_202_and_finishes(api, async_endpoint, tiny_models):
    response = api("POST", "/inferences", json={
        "task_type": "txt2img", "inference_type": "Async", "models": {"Stable-diffusion": [tiny_models["model"]]},
        "sagemaker_endpoint_name": async_endpoint, "payload_string": json.dumps(payload()),
    })
    assert response.status_code == 202, response.text
    inference_id = response.json()["data"]["inference"]["inference_id"]
    job = wait_for(lambda: (j := api("GET", f"/inferences/{inference_id}").json()["data"])["status"] == "succeed" and j, timeout=120)
    assert len(job["img_presigned_urls"]) == 1


def test_a_client_bound_to_the_events_sees_started_progress_and_succeeded(api, stack, async_endpoint, tiny_models):
    created = api("POST", "/inferences", json={"task_type": "txt2img", "inference_type": "Async", "models": {"Stable-diffusion": [tiny_models["model"]]}, "sagemaker_endpoint_name": async_endpoint})
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
