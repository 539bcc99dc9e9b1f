"""What `make up` shows last: the platform generating an image through its public API.

Idempotently registers the tiny Stable-Diffusion-shaped model (random weights, made here: no
download) as a checkpoint, creates the default Async endpoint, then runs one txt2img job as
any ESD client would (create, upload api_param.json to the presigned URL, start, poll) and
saves the image under ./out/."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

TINY_MODEL = "esd-tiny-sd15.safetensors"
ENDPOINT = "default"  # stored as esd-async-default
PAYLOAD = {
    "prompt": "a lighthouse on a cliff at dusk",
    "negative_prompt": "blurry",
    "steps": 12,
    "sampler_name": "Euler a",
    "cfg_scale": 7,
    "width": 128,
    "height": 128,
    "seed": -1,
    "batch_size": 1,
}


class Client:
    def __init__(self, url: str, api_key: str, username: str) -> None:
        self.http = httpx.Client(base_url=url, headers={"x-api-key": api_key, "username": username}, timeout=120)

    def call(self, method: str, path: str, expected: tuple[int, ...], **kwargs) -> dict:
        response = self.http.request(method, path, **kwargs)
        if response.status_code not in expected:
            raise RuntimeError(f"{method} {path} answered {response.status_code}: {response.text}")
        return response.json() if response.content else {}


def _ensure_model(client: Client, var_dir: Path, say) -> None:
    listed = client.call(
        "GET", "/checkpoints", (200,), params={"types": "Stable-diffusion", "status": "Active", "per_page": 1000}
    )
    if any(TINY_MODEL in item["name"] for item in listed.get("data", {}).get("checkpoints", [])):
        return
    from diffusion.testing import make_tiny_checkpoint

    path = make_tiny_checkpoint(var_dir / TINY_MODEL, seed=0)
    created = client.call(
        "POST",
        "/checkpoints",
        (201,),
        json={
            "checkpoint_type": "Stable-diffusion",
            "filenames": [{"filename": TINY_MODEL, "parts_number": 1}],
            "params": {"message": "tiny SD 1.5-shaped model with random weights, for the demo"},
        },
    )["data"]
    etag = httpx.put(created["s3PresignUrl"][TINY_MODEL][0], content=path.read_bytes(), timeout=120).headers["etag"]
    client.call(
        "PUT",
        f"/checkpoints/{created['checkpoint']['id']}",
        (200,),
        json={
            "status": "Active",
            "multi_parts_tags": {TINY_MODEL: [{"ETag": etag, "PartNumber": 1}]},
        },
    )
    say(f"registered the tiny model {TINY_MODEL}")


def _ensure_endpoint(client: Client, say, timeout: float = 300) -> str:
    name = f"esd-async-{ENDPOINT}"
    listed = client.call("GET", "/endpoints", (200,))["data"]["endpoints"]
    if not any(endpoint["endpoint_name"] == name for endpoint in listed):
        client.call(
            "POST",
            "/endpoints",
            (202,),
            json={
                "endpoint_name": ENDPOINT,
                "endpoint_type": "Async",
                "instance_type": "local",
                "initial_instance_count": 1,
                "autoscaling_enabled": True,
                "min_instance_number": 0,
                "max_instance_number": 2,
                "assign_to_roles": ["IT Operator"],
            },
        )
        say(f"created the endpoint {name}; waiting for its first worker")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for endpoint in client.call("GET", "/endpoints", (200,))["data"]["endpoints"]:
            if endpoint["endpoint_name"] == name:
                if endpoint["endpoint_status"] == "InService":
                    return name
                if endpoint["endpoint_status"] == "Failed":
                    raise RuntimeError(f"endpoint {name} failed: {endpoint['error']}")
        time.sleep(0.5)
    raise RuntimeError(f"endpoint {name} was not in service within {timeout:g} s")


def generate(url: str, api_key: str, username: str, var_dir: Path, out_dir: Path, say=print) -> Path:
    client = Client(url, api_key, username)
    _ensure_model(client, var_dir, say)
    endpoint = _ensure_endpoint(client, say)
    inference = client.call(
        "POST",
        "/inferences",
        (201,),
        json={
            "task_type": "txt2img",
            "inference_type": "Async",
            "sagemaker_endpoint_name": endpoint,
            "models": {"Stable-diffusion": [TINY_MODEL], "VAE": ["Automatic"]},
        },
    )["data"]["inference"]
    httpx.put(
        inference["api_params_s3_upload_url"], content=json.dumps(PAYLOAD).encode(), timeout=60
    ).raise_for_status()
    client.call("PUT", f"/inferences/{inference['id']}/start", (202,))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = client.call("GET", f"/inferences/{inference['id']}", (200,))["data"]
        if job["status"] == "failed":
            raise RuntimeError(f"the demo job failed: {job.get('error')}")
        if job["status"] == "succeed":
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"{inference['id']}.png"
            path.write_bytes(httpx.get(job["img_presigned_urls"][0], timeout=60).content)
            return path.resolve()
        time.sleep(0.2)
    raise RuntimeError("the demo job did not finish within 300 s")
