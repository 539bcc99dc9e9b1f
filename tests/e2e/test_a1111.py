"""AUTOMATIC1111 payloads through the whole stack: hires fix, ControlNet units (a tiny ControlNet
uploaded as a `ControlNet` checkpoint) and long weighted prompts with BREAK."""

import base64
import io

import httpx
import pytest
from PIL import Image

from tests.e2e.test_inference import (
    create_endpoint,
    images_of,
    payload,
    run_async,
    unique,
    upload_checkpoint,
    wait_endpoint,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def a1111_models(tmp_path_factory, api):
    from diffusion.testing import make_tiny_checkpoint, make_tiny_controlnet

    folder = tmp_path_factory.mktemp("a1111-models")
    model, controlnet = folder / "tiny.safetensors", folder / "control_tiny_canny.safetensors"
    make_tiny_checkpoint(model, seed=0)
    make_tiny_controlnet(model, controlnet, seed=1)
    names = {"model": unique("tiny-sd15.safetensors"), "controlnet": unique("control_tiny_canny.safetensors")}
    upload_checkpoint(api, model, "Stable-diffusion", names["model"])
    upload_checkpoint(api, controlnet, "ControlNet", names["controlnet"])
    return names


@pytest.fixture(scope="module")
def endpoint(api, a1111_models):
    name = create_endpoint(api, endpoint_name=unique("a1111")[:20])
    wait_endpoint(api, name)
    yield name
    api("DELETE", "/endpoints", json={"endpoint_name_list": [name]})


def _square() -> str:
    image = Image.new("RGB", (64, 64), "white")
    image.paste((0, 0, 0), (16, 16, 48, 48))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_hires_fix_gives_images_of_the_hires_size(api, endpoint, a1111_models):
    body = payload(
        batch_size=2,
        enable_hr=True,
        hr_scale=1.5,
        hr_upscaler="Latent (bicubic antialiased)",
        hr_second_pass_steps=3,
        denoising_strength=0.6,
    )
    job = run_async(api, endpoint, {"Stable-diffusion": [a1111_models["model"]]}, body)
    assert job["status"] == "succeed", job.get("error")
    images = images_of(job)
    assert [image.size for image in images] == [(96, 96), (96, 96)]
    text = images[0].info["parameters"]
    assert "Size: 64x64" in text and "Hires upscale: 1.5, Hires steps: 3, Hires upscaler: Latent (bicubic" in text
    resized = run_async(
        api,
        endpoint,
        {"Stable-diffusion": [a1111_models["model"]]},
        payload(enable_hr=True, hr_resize_x=128, hr_resize_y=96, hr_upscaler="Lanczos"),
    )
    assert resized["status"] == "succeed", resized.get("error")
    assert images_of(resized)[0].size == (128, 96)


def test_a_controlnet_unit_steers_the_job(api, endpoint, a1111_models):
    models = {"Stable-diffusion": [a1111_models["model"]], "ControlNet": [a1111_models["controlnet"]]}
    stem = a1111_models["controlnet"].removesuffix(".safetensors")
    unit = {"enabled": True, "module": "canny", "model": f"{stem} [1a2b3c4d]", "image": _square(), "weight": 1.0}
    plain = run_async(api, endpoint, models, payload(seed=21))
    steered = run_async(api, endpoint, models, payload(seed=21, alwayson_scripts={"controlnet": {"args": [unit]}}))
    assert steered["status"] == "succeed", steered.get("error")
    assert images_of(plain)[0].tobytes() != images_of(steered)[0].tobytes()
    assert "ControlNet 0: " in images_of(steered)[0].info["parameters"]
    record = httpx.get(steered["output_presigned_urls"][0]).json()
    assert "image" not in record["parameters"]["alwayson_scripts"]["controlnet"]["args"][0]

    unknown = {**unit, "model": "control_v11p_sd15_depth [fefefefe]"}
    failed = run_async(api, endpoint, models, payload(alwayson_scripts={"controlnet": {"args": [unknown]}}))
    assert failed["status"] == "failed"
    assert "ControlNet 'control_v11p_sd15_depth' is not among the job's ControlNet models" in failed["error"]


def test_a_long_weighted_prompt_with_break_runs(api, endpoint, a1111_models):
    words = ", ".join(["a (red:1.3) cube", "[blue] sky", "((detailed))", "(best quality:1.2)"] * 12)
    body = payload(prompt=f"{words} BREAK a \\(small\\) house", negative_prompt="(blurry:1.4), lowres")
    job = run_async(api, endpoint, {"Stable-diffusion": [a1111_models["model"]]}, body)
    assert job["status"] == "succeed", job.get("error")
    image = images_of(job)[0]
    assert image.size == (64, 64)
    assert image.info["parameters"].startswith(words[:40])
    assert "Pad conds: True" in image.info["parameters"]
