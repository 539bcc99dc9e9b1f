"""Hostile input over the real stack: JSON nested to exhaust a parser, in a body, in
`payload_string` and in `api_param.json`; payloads and prompts too large; URLs that resolvers
read their own way; failed downloads and the names they held; file names that are paths;
pickles that carry code; images that are not images or declare gigapixels. Each gets a clear
4xx or a failed job with the reason, no process crashes, and no user's text reaches a log.
The pure decisions are in tests/unit/test_hostile_input.py."""

import base64
import json
import uuid

import httpx
import pytest

from tests.e2e.test_checkpoints import get_checkpoint, safetensors_bytes
from tests.e2e.test_inference import payload, unique, upload_checkpoint, wait_endpoint
from tests.support import wait_for
from tests.unit.test_hostile_input import hostile_checkpoint, nested, png_declaring

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def models(tmp_path_factory, api):
    from diffusion.testing import make_tiny_checkpoint

    folder = tmp_path_factory.mktemp("hostile-models")
    make_tiny_checkpoint(folder / "tiny.safetensors", seed=0)
    evil, marker = hostile_checkpoint(folder, "evil.ckpt")
    names = {"model": unique("tiny.safetensors"), "evil": unique("evil.ckpt")}
    upload_checkpoint(api, folder / "tiny.safetensors", "Stable-diffusion", names["model"])
    upload_checkpoint(api, evil, "Stable-diffusion", names["evil"])
    return {**names, "marker": marker}


@pytest.fixture(scope="module")
def endpoint(api, models):
    response = api(
        "POST",
        "/endpoints",
        json={
            "endpoint_name": unique("hostile")[:20],
            "endpoint_type": "Async",
            "instance_type": "cpu",
            "initial_instance_count": 1,
            "assign_to_roles": ["IT Operator"],
        },
    )
    assert response.status_code == 202, response.text
    name = response.json()["data"]["endpoint_name"]
    wait_endpoint(api, name)
    yield name
    api("DELETE", "/endpoints", json={"endpoint_name_list": [name]})


def create_job(api, endpoint: str, models: dict, task: str = "txt2img") -> dict:
    created = api(
        "POST",
        "/inferences",
        json={"task_type": task, "inference_type": "Async", "models": models, "sagemaker_endpoint_name": endpoint},
    )
    assert created.status_code == 201, created.text
    return created.json()["data"]["inference"]


def finished(api, inference_id: str) -> dict:
    return wait_for(
        lambda: (
            (job := api("GET", f"/inferences/{inference_id}").json()["data"])["status"] in ("succeed", "failed") and job
        ),
        timeout=180,
        what="the job",
    )


def run_raw(api, endpoint: str, models: dict, raw: bytes, task: str = "txt2img") -> dict:
    """A job whose api_param.json is `raw`, as a client uploads it."""
    inference = create_job(api, endpoint, models, task)
    assert httpx.put(inference["api_params_s3_upload_url"], content=raw).status_code == 200
    started = api("PUT", f"/inferences/{inference['id']}/start")
    assert started.status_code == 202, started.text
    return finished(api, inference["id"])


# --- JSON nested deep, and too large --------------------------------------------------------


@pytest.mark.parametrize("idempotency", [False, True])
def test_a_body_nested_ten_thousand_deep_is_a_400(api, idempotency):
    body = '{"checkpoint_type": "Lora", "urls": ["http://example.com/a.pt"], "params": ' + nested(10_000) + "}"
    headers = {"content-type": "application/json"}
    if idempotency:  # the key's fingerprint parses the body too
        headers["Idempotency-Key"] = uuid.uuid4().hex
    response = api("POST", "/checkpoints", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert (
        "request body nests arrays and objects deeper than 64 levels (ESD_MAX_JSON_DEPTH)" in response.json()["message"]
    )
    assert api("GET", "/ping").status_code == 200


def test_payload_string_nested_ten_thousand_deep_is_a_400(api, models):
    response = api(
        "POST",
        "/inferences",
        json={
            "task_type": "txt2img",
            "inference_type": "Async",
            "models": {"Stable-diffusion": [models["model"]]},
            "payload_string": nested(10_000),
        },
    )
    assert response.status_code == 400, response.text
    assert "payload_string nests arrays and objects deeper than 64 levels" in response.json()["message"]


def test_api_param_nested_ten_thousand_deep_fails_the_job_with_the_reason(api, endpoint, models):
    job = run_raw(api, endpoint, {"Stable-diffusion": [models["model"]]}, nested(10_000).encode())
    assert job["status"] == "failed"
    assert job["error"] == "api_param.json nests arrays and objects deeper than 64 levels (ESD_MAX_JSON_DEPTH)"
    # the worker lives on and runs the next job
    assert (
        run_raw(api, endpoint, {"Stable-diffusion": [models["model"]]}, json.dumps(payload()).encode())["status"]
        == "succeed"
    )


def test_an_api_param_over_the_size_limit_is_refused_before_any_worker_reads_it(api, endpoint, models):
    inference = create_job(api, endpoint, {"Stable-diffusion": [models["model"]]})
    body = json.dumps(payload(prompt="x")).encode()
    oversize = body[:-1] + b" " * (32 * 1024 * 1024) + b"}"
    assert httpx.put(inference["api_params_s3_upload_url"], content=oversize).status_code == 200
    started = api("PUT", f"/inferences/{inference['id']}/start")
    assert started.status_code == 400
    assert (
        f"api_param.json is {len(oversize)} bytes; at most 33554432 are accepted (ESD_MAX_PAYLOAD_BYTES)"
        in (started.json()["message"])
    )
    assert api("GET", f"/inferences/{inference['id']}").json()["data"]["status"] == "created"


def test_a_prompt_of_100000_characters_fails_the_job_and_reaches_no_log(api, stack, endpoint, models):
    secret = uuid.uuid4().hex
    prompt = (secret + " ") * (100_000 // 33 + 1)
    job = run_raw(api, endpoint, {"Stable-diffusion": [models["model"]]}, json.dumps(payload(prompt=prompt)).encode())
    assert job["status"] == "failed"
    assert f"prompt is {len(prompt)} characters long; at most 20000 are accepted (ESD_MAX_PROMPT_CHARS)" in job["error"]
    logs = {path.name: path.read_text(errors="replace") for path in (stack.var_dir / "log").glob("*.log")}
    assert logs and not [name for name, text in logs.items() if secret in text]


def test_a_finished_job_shows_its_info_from_the_record_the_worker_stored(api, endpoint, models):
    # the worker reports object keys; the service reads `info` from <id>_param.json
    prompt = "a hostile but reasonable prompt " * 500  # 16,000 characters: within the limit
    job = run_raw(api, endpoint, {"Stable-diffusion": [models["model"]]}, json.dumps(payload(prompt=prompt)).encode())
    assert job["status"] == "succeed", job.get("error")
    assert job["info"]["prompt"] == prompt.strip() or job["info"]["prompt"] == prompt
    assert job["info"]["all_seeds"] == [1234]


# --- checkpoints by URL ---------------------------------------------------------------------


def test_an_octal_host_is_a_400_not_a_checkpoint_left_initial(api):
    response = api("POST", "/checkpoints", json={"checkpoint_type": "Lora", "urls": ["http://0177.0.0.1/x.pt"]})
    assert response.status_code == 400, response.text
    assert "http://0177.0.0.1/x.pt is not a valid URL" in response.json()["message"]


def test_a_failed_download_frees_its_file_name(api, file_server):
    name = unique("retry.safetensors")
    response = api(
        "POST", "/checkpoints", json={"checkpoint_type": "Lora", "urls": [f"{file_server.url}/files/{name}"]}
    )
    (queued,) = response.json()["data"]["checkpoints"]
    checkpoint = wait_for(lambda: (c := get_checkpoint(api, queued["id"]))["status"] != "Initial" and c, what="failure")
    assert checkpoint["status"] == "Failed" and "answered 404" in checkpoint["error"]
    # the file is there now: the retry downloads it instead of answering "already exists"
    data = safetensors_bytes(0.1, seed=3)
    (file_server.folder / name).write_bytes(data)
    response = api(
        "POST", "/checkpoints", json={"checkpoint_type": "Lora", "urls": [f"{file_server.url}/files/{name}"]}
    )
    assert response.status_code == 202, response.text
    (queued,) = response.json()["data"]["checkpoints"]
    checkpoint = wait_for(lambda: (c := get_checkpoint(api, queued["id"]))["status"] != "Initial" and c, what="retry")
    assert checkpoint["status"] == "Active", checkpoint.get("error")
    assert checkpoint["name"] == [name]


# --- file names -----------------------------------------------------------------------------


BAD_NAMES = ["../escape.png", "/etc/passwd.png", "a\x00b.png", "x" * 300 + ".png", "é" * 200 + ".png"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_dataset_and_checkpoint_file_names_that_are_paths_or_too_long_are_400(api, name):
    dataset = api(
        "POST",
        "/datasets",
        json={"dataset_name": unique("set"), "content": [{"filename": name, "name": "x", "type": "image"}]},
    )
    assert dataset.status_code == 400, dataset.text
    checkpoint = api(
        "POST",
        "/checkpoints",
        json={"checkpoint_type": "Lora", "filenames": [{"filename": name.replace(".png", ".pt"), "parts_number": 1}]},
    )
    assert checkpoint.status_code == 400, checkpoint.text


# --- pickles and images ---------------------------------------------------------------------


def test_a_pickled_checkpoint_carrying_code_fails_the_job_and_nothing_runs(api, endpoint, models):
    job = run_raw(api, endpoint, {"Stable-diffusion": [models["evil"]]}, json.dumps(payload()).encode())
    assert job["status"] == "failed"
    assert f"{models['evil']} could not be read as a checkpoint" in job["error"]
    assert not models["marker"].exists()


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (base64.b64encode(png_declaring(100_000, 100_000)).decode(), "ESD_MAX_IMAGE_PIXELS"),
        (base64.b64encode(png_declaring(6000, 5000)).decode(), "6000 x 5000 pixels; at most 25000000"),
        (base64.b64encode(b"GIF89a but not really").decode(), "not a base64-encoded PNG or JPEG image"),
    ],
)
def test_img2img_and_extras_with_a_bomb_or_no_image_fail_with_the_reason(api, endpoint, models, image, reason):
    job = run_raw(
        api,
        endpoint,
        {"Stable-diffusion": [models["model"]]},
        json.dumps(payload(init_images=[image], denoising_strength=0.5)).encode(),
        task="img2img",
    )
    assert job["status"] == "failed" and reason in job["error"]
    job = run_raw(
        api, endpoint, {}, json.dumps({"image": image, "upscaler_1": "Lanczos"}).encode(), task="extra-single-image"
    )
    assert job["status"] == "failed" and reason in job["error"]
