"""The hires fix: A1111's sizes, its upscalers, a second pass that refines, and its infotext."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
import torch
from PIL import Image, ImageChops

from services.inference.worker.engine import (
    Engine,
    GenerationRequest,
    InvalidPayload,
    ModelFiles,
    UnknownUpscaler,
    Upscalers,
)
from services.inference.worker.engine.hires import (
    LATENT_UPSCALERS,
    plan_hires,
    target_size,
    upscale_image,
    upscale_latents,
)

SMALL = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "steps": 3, "width": 64, "height": 64, "seed": 5}


def _request(**payload) -> GenerationRequest:
    return GenerationRequest.from_payload("txt2img", {**SMALL, "enable_hr": True, **payload})


@pytest.mark.parametrize(
    ("size", "scale", "resize", "expected"),
    [
        ((512, 512), 2.0, (0, 0), (1024, 1024, 0, 0)),
        ((512, 768), 1.5, (0, 0), (768, 1152, 0, 0)),
        ((512, 512), 1.3, (0, 0), (665, 665, 0, 0)),  # int(), as A1111; the image is 664 wide
        ((512, 768), 2.0, (1024, 0), (1024, 1536, 0, 0)),  # width alone keeps the ratio
        ((512, 768), 2.0, (0, 1024), (682, 1024, 0, 0)),
        # both: cover the box, crop the excess in latent pixels
        ((512, 512), 2.0, (1024, 768), (1024, 1024, 0, 32)),
        ((768, 512), 2.0, (1024, 1024), (1536, 1024, 64, 0)),
    ],
)
def test_target_size_is_a1111s(size, scale, resize, expected):
    assert target_size(*size, scale, *resize) == expected


def test_the_plan_gives_multiples_of_8_and_a1111s_infotext():
    plan = plan_hires(_request(width=512, height=512, hr_scale=1.3, steps=20))
    assert plan is not None and (plan.width, plan.height) == (664, 664)
    assert plan.upscaler == "Latent" and plan.latent_mode == ("bilinear", False) and plan.steps == 20
    assert plan.infotext == {"Hires upscale": 1.3}  # no upscaler named: not written, as in A1111
    cropped = plan_hires(
        _request(
            hr_resize_x=128,
            hr_resize_y=96,
            hr_upscaler="Lanczos",
            hr_second_pass_steps=2,
            hr_sampler_name="DDIM",
            hr_prompt="a photo of a dog",
        )
    )
    assert (cropped.width, cropped.height) == (128, 96)
    assert cropped.prompt == "a photo of a dog" and cropped.negative_prompt == "blurry"
    assert cropped.infotext == {
        "Hires sampler": "DDIM",
        "Hires prompt": "a photo of a dog",
        "Hires resize": "128x96",
        "Hires steps": 2,
        "Hires upscaler": "Lanczos",
    }
    assert plan_hires(GenerationRequest.from_payload("txt2img", SMALL)) is None


def test_the_latent_modes_are_a1111s():
    assert set(LATENT_UPSCALERS) == {
        "Latent",
        "Latent (antialiased)",
        "Latent (bicubic)",
        "Latent (bicubic antialiased)",
        "Latent (nearest)",
        "Latent (nearest-exact)",
    }


def test_a_hires_size_out_of_range_or_without_steps_is_refused():
    with pytest.raises(InvalidPayload, match="hires size 16384x16384"):
        plan_hires(_request(width=2048, height=2048, hr_scale=8))
    with pytest.raises(InvalidPayload, match="denoising_strength: 0.1 x 3 hires steps"):
        _request(denoising_strength=0.1)


def test_latents_and_images_are_upscaled_and_cropped_to_the_plan():
    plan = plan_hires(_request(hr_resize_x=128, hr_resize_y=96))
    latents = torch.randn(2, 4, 8, 8)
    assert upscale_latents(latents, plan).shape == (2, 4, 12, 16)
    nearest = plan_hires(_request(hr_upscaler="Latent (nearest)", hr_scale=2))
    doubled = upscale_latents(latents, nearest)
    assert torch.equal(doubled[:, :, ::2, ::2], latents)
    image = Image.new("RGB", (64, 64), "red")
    assert upscale_image(image, with_upscaler(_request(hr_upscaler="Nearest", hr_scale=1.5))).size == (96, 96)
    assert upscale_image(image, with_upscaler(_request(hr_upscaler="None", hr_resize_x=128, hr_resize_y=96))).size == (
        128,
        96,
    )


def with_upscaler(request):
    plan = plan_hires(request)
    return replace(plan, upscale=Upscalers().find(plan.upscaler, {}))


def test_the_plans_upscaler_brings_the_image_to_the_target_size():
    calls = []

    def model(image: Image.Image, target: tuple[int, int]) -> Image.Image:
        calls.append(target)
        return image.resize(target)

    plan = replace(plan_hires(_request(hr_upscaler="2x-model", hr_scale=2)), upscale=model)
    assert upscale_image(Image.new("RGB", (64, 64)), plan).size == (128, 128)
    assert calls == [(128, 128)]


def test_an_unknown_upscaler_fails_the_job_naming_the_known_ones(engine, checkpoint):
    request = GenerationRequest.from_payload("txt2img", {**SMALL, "enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"})
    with pytest.raises(UnknownUpscaler, match=r"'R-ESRGAN 4x\+' is not available; this job can use None, Lanczos"):
        engine.generate(request, ModelFiles(checkpoint=checkpoint))


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine()


def _png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _difference(first: Image.Image, second: Image.Image) -> int:
    return max(high for _, high in ImageChops.difference(first.convert("RGB"), second.convert("RGB")).getextrema())


@pytest.mark.parametrize("upscaler", [None, "Latent (bicubic antialiased)", "Lanczos", "None"])
def test_hires_gives_the_target_size_and_refines_rather_than_stretches(engine, checkpoint, upscaler):
    models = ModelFiles(checkpoint=checkpoint)
    plain = _png(engine.generate(GenerationRequest.from_payload("txt2img", SMALL), models).images[0])
    extra = {"hr_upscaler": upscaler} if upscaler else {}
    result = engine.generate(_request(hr_scale=1.5, denoising_strength=0.6, **extra), models)
    hires = _png(result.images[0])
    assert hires.size == (96, 96)
    stretched = plain.resize((96, 96), Image.Resampling.LANCZOS)
    assert _difference(hires, stretched) > 10  # the second pass made new detail
    text = hires.text["parameters"]
    assert "Size: 64x64" in text and "Denoising strength: 0.6, Hires upscale: 1.5" in text
    assert (f"Hires upscaler: {upscaler}" in text) == (upscaler is not None)
    assert result.info["extra_generation_params"]["Hires upscale"] == 1.5


def test_hires_with_its_own_prompt_sampler_and_steps(engine, checkpoint):
    models = ModelFiles(checkpoint=checkpoint)
    seen: list[tuple[int, int]] = []
    base = {"hr_resize_x": 96, "hr_resize_y": 72, "hr_second_pass_steps": 4, "denoising_strength": 0.5}
    request = _request(**base, hr_sampler_name="DPM++ 2M", hr_prompt="a (photo:1.2) of a dog", n_iter=2)
    result = engine.generate(request, models, progress=lambda step, total: seen.append((step, total)))
    assert [_png(image).size for image in result.images] == [(96, 72), (96, 72)]
    # 3 first-pass steps and int(4 x 0.5) second-pass steps, for each of the 2 iterations
    assert seen == [(step, 10) for step in range(1, 11)]
    text = _png(result.images[0]).text["parameters"]
    assert "Hires sampler: DPM++ 2M" in text and 'Hires prompt: "a (photo:1.2) of a dog"' in text
    assert "Hires resize: 96x72, Hires steps: 4" in text
    same_prompt = engine.generate(_request(**base, hr_sampler_name="DPM++ 2M", n_iter=2), models)
    assert _difference(_png(result.images[0]), _png(same_prompt.images[0])) > 0


def test_hires_on_sdxl(engine, sdxl_checkpoint):
    result = engine.generate(_request(hr_scale=1.5, batch_size=2), ModelFiles(checkpoint=sdxl_checkpoint))
    assert [_png(image).size for image in result.images] == [(96, 96), (96, 96)]
