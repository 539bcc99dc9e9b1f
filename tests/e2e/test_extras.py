"""The extras and background removal through HTTP: upscaler and rembg models uploaded as
checkpoints of their types, jobs of ESD's task types `extra-single-image`,
`extra-batch-images` and `rembg` run by a real worker process."""

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.e2e.test_inference import images_of, run_async, unique, upload_checkpoint, wait_endpoint

pytestmark = pytest.mark.e2e


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def image_models(tmp_path_factory, api):
    """A 2x compact RealESRGAN uploaded as an ESRGAN checkpoint (.pth), a 2x RRDBNet as a
    RealESRGAN checkpoint (.safetensors) and a tiny U^2-Net-shaped rembg model (.onnx)."""
    from diffusion.testing import make_tiny_rembg_model, make_tiny_upscaler

    folder = tmp_path_factory.mktemp("image-models")
    names = {
        "compact": unique("2x-compact.pth"),
        "esrgan": unique("2x-esrgan.safetensors"),
        "rembg": unique("u2netp.onnx"),
    }
    upload_checkpoint(api, make_tiny_upscaler(folder / "compact.pth", arch="compact"), "ESRGAN", names["compact"])
    upload_checkpoint(
        api, make_tiny_upscaler(folder / "esrgan.safetensors", arch="esrgan"), "RealESRGAN", names["esrgan"]
    )
    upload_checkpoint(api, make_tiny_rembg_model(folder / "u2netp.onnx"), "rembg", names["rembg"])
    return names


@pytest.fixture(scope="module")
def endpoint(api, image_models):
    response = api(
        "POST",
        "/endpoints",
        json={
            "endpoint_name": unique("extras")[:20],
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


def stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


def test_extra_single_image_upscales_with_an_uploaded_model(api, endpoint, image_models):
    models = {"ESRGAN": [image_models["compact"]]}
    body = {"upscaler_1": stem(image_models["compact"]), "upscaling_resize": 2, "resize_mode": 0}
    job = run_async(api, endpoint, models, {**body, "image": b64(noise(64, 48))}, task="extra-single-image")
    assert job["status"] == "succeed", job.get("error")
    assert job["taskType"] == "extra-single-image"
    assert job["image_names"] == ["image_0.png"]
    [image] = images_of(job)
    assert (image.size, image.mode) == ((128, 96), "RGB")
    assert image.info["postprocessing"] == f"Postprocess upscale by: 2, Postprocess upscaler: {body['upscaler_1']}"
    record = httpx.get(job["output_presigned_urls"][0]).json()
    assert record["parameters"]["upscaler_1"] == body["upscaler_1"] and record["info"]["sizes"] == [[128, 96]]
    assert job["params"]["used_models"]["ESRGAN"][0]["model_name"] == image_models["compact"]
    # the model's output, so another input gives another image
    other = run_async(api, endpoint, models, {**body, "image": b64(noise(64, 48, seed=1))}, task="extra-single-image")
    assert images_of(other)[0].tobytes() != image.tobytes()


def test_extra_batch_images_returns_one_image_per_input_named_after_it(api, endpoint, image_models):
    body = {
        "imageList": [{"data": b64(noise(40, 24)), "name": "cat.jpg"}, {"data": b64(noise(16, 32, 1)), "name": "dog"}],
        "upscaler_1": stem(image_models["esrgan"]),
        "resize_mode": 1,
        "upscaling_resize_w": 64,
        "upscaling_resize_h": 64,
        "upscaling_crop": True,
    }
    job = run_async(api, endpoint, {"RealESRGAN": [image_models["esrgan"]]}, body, task="extra-batch-images")
    assert job["status"] == "succeed", job.get("error")
    assert job["image_names"] == ["cat.png", "dog.png"]
    assert [(image.size, image.mode) for image in images_of(job)] == [((64, 64), "RGB"), ((64, 64), "RGB")]


def test_lanczos_needs_no_model(api, endpoint):
    body = {"image": b64(noise(30, 20)), "upscaler_1": "Lanczos", "upscaling_resize": 3}
    job = run_async(api, endpoint, {}, body, task="extra-single-image")
    assert job["status"] == "succeed", job.get("error")
    assert images_of(job)[0].size == (88, 56)  # 90x60, rounded down to multiples of 8


def test_an_upscaler_the_job_does_not_have_fails_naming_the_ones_it_has(api, endpoint, image_models):
    body = {"image": b64(noise(16, 16)), "upscaler_1": "R-ESRGAN 4x+"}
    job = run_async(api, endpoint, {"ESRGAN": [image_models["compact"]]}, body, task="extra-single-image")
    assert job["status"] == "failed"
    assert "'R-ESRGAN 4x+' is not available" in job["error"]
    assert stem(image_models["compact"]) in job["error"]


def test_rembg_cuts_out_an_rgba_image_of_the_inputs_size_or_gives_the_mask(api, endpoint, image_models):
    models = {"rembg": [image_models["rembg"]]}
    body = {"input_image": b64(noise(72, 40)), "model": stem(image_models["rembg"])}
    cutout = run_async(api, endpoint, models, body, task="rembg")
    assert cutout["status"] == "succeed", cutout.get("error")
    [image] = images_of(cutout)
    assert (image.size, image.mode) == ((72, 40), "RGBA")
    masked = run_async(api, endpoint, models, {**body, "return_mask": True}, task="rembg")
    assert masked["status"] == "succeed", masked.get("error")
    [mask] = images_of(masked)
    assert (mask.size, mask.mode) == ((72, 40), "L")
    assert np.array_equal(np.asarray(image)[:, :, 3], np.asarray(mask))


def test_an_unknown_rembg_model_fails_naming_the_available_ones(api, endpoint, image_models):
    body = {"input_image": b64(noise(16, 16)), "model": "isnet-general-use"}
    job = run_async(api, endpoint, {"rembg": [image_models["rembg"]]}, body, task="rembg")
    assert job["status"] == "failed"
    assert f"rembg model 'isnet-general-use' is not available; available: {stem(image_models['rembg'])}" in job["error"]
