"""AUTOMATIC1111 bodies become requests; a bad value is refused with the field's name."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from services.inference.worker.engine import GenerationRequest, InvalidPayload, UnknownSampler
from services.inference.worker.engine.samplers import resolve_sampler
from shared.errors import Invalid


def _png_base64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_defaults_are_a1111s():
    request = GenerationRequest.from_payload("txt2img", {"prompt": "a cat"})
    assert (request.steps, request.sampler_name, request.cfg_scale) == (20, "Euler a", 7.0)
    assert (request.width, request.height, request.seed, request.batch_size, request.n_iter) == (
        512,
        512,
        -1,
        1,
        1,
    )


def test_unknown_keys_nulls_and_infinity_are_accepted():
    body = json.loads(
        '{"prompt": "a cat", "s_tmax": Infinity, "s_churn": 0, "negative_prompt": null,'
        ' "alwayson_scripts": {"controlnet": {"args": []}}, "override_settings": {"sd_vae": "Automatic"},'
        ' "sampler_index": "DDIM", "subseed": 42}'
    )
    request = GenerationRequest.from_payload("txt2img", body)
    assert request.negative_prompt == ""
    assert request.sampler_name == "DDIM"  # the old field name, when sampler_name is absent
    assert request.vae_setting is None


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"width": 100}, "width"),
        ({"height": 30}, "height"),
        ({"sampler_name": "Warp drive"}, "sampler_name"),
        ({"steps": "x"}, "steps"),
        ({"steps": 0}, "steps"),
        ({"cfg_scale": float("inf")}, "cfg_scale"),
        ({"seed": -7}, "seed"),
        ({"scheduler": "Sideways"}, "scheduler"),
        ({"batch_size": 0}, "batch_size"),
        ({"init_images": ["not an image"]}, "init_images"),
    ],
)
def test_a_bad_value_names_its_field(payload, field):
    with pytest.raises(InvalidPayload, match=rf"^invalid txt2img payload: {field}") as caught:
        GenerationRequest.from_payload("txt2img", payload)
    assert isinstance(caught.value, Invalid) and caught.value.message == str(caught.value)


def test_unknown_sampler_lists_the_known_ones():
    known = "known samplers: .*DPM\\+\\+ 2M Karras.*Euler a"
    with pytest.raises(InvalidPayload, match=f"sampler_name: unknown sampler 'Warp drive'; {known}"):
        GenerationRequest.from_payload("txt2img", {"sampler_name": "Warp drive"})
    with pytest.raises(UnknownSampler, match="known schedule types: Automatic, Uniform, Karras"):
        resolve_sampler("Euler", "Sideways")


def test_img2img_needs_an_image_and_at_least_one_step():
    with pytest.raises(InvalidPayload, match="init_images"):
        GenerationRequest.from_payload("img2img", {"prompt": "a cat"})
    with pytest.raises(InvalidPayload, match="denoising_strength"):
        GenerationRequest.from_payload(
            "img2img", {"init_images": [_png_base64()], "steps": 4, "denoising_strength": 0.1}
        )
    request = GenerationRequest.from_payload("img2img", {"init_images": ["data:image/png;base64," + _png_base64()]})
    assert request.init_image().size == (8, 8)


def test_task_must_be_txt2img_or_img2img():
    with pytest.raises(InvalidPayload, match=r"task type rembg should be in \['txt2img', 'img2img'\]"):
        GenerationRequest.from_payload("rembg", {})


@pytest.mark.parametrize(
    ("sampler_name", "scheduler", "expected"),
    [
        ("Euler a", None, ("Euler a", "Uniform")),
        ("DPM++ 2M Karras", None, ("DPM++ 2M", "Karras")),
        ("DPM++ 2M", "Karras", ("DPM++ 2M", "Karras")),
        ("DPM++ 2M", None, ("DPM++ 2M", "Uniform")),
        ("DPM++ 2M", "Automatic", ("DPM++ 2M", "Karras")),  # A1111 1.9's default for it
        ("DDIM", "Karras", ("DDIM", "Uniform")),  # no sigmas to shape: ignored, as in A1111
        ("k_euler_a", None, ("Euler a", "Uniform")),
    ],
)
def test_sampler_names_and_schedule_types(sampler_name, scheduler, expected):
    choice = resolve_sampler(sampler_name, scheduler)
    assert (choice.sampler, choice.schedule) == expected


def test_lora_tags_are_taken_out_of_the_prompt():
    request = GenerationRequest.from_payload(
        "txt2img", {"prompt": "a cat <lora:ink:0.6>, detailed <lora:glow> <lyco:soft:0.5:0.2>"}
    )
    prompt, weights = request.lora_tags()
    assert prompt == "a cat, detailed"
    assert weights == {"ink": 0.6, "glow": 1.0, "soft": 0.5}


def test_a_lora_weight_must_be_a_number():
    request = GenerationRequest.from_payload("txt2img", {"prompt": "a cat <lora:ink:strong>"})
    with pytest.raises(InvalidPayload, match="prompt: LoRA 'ink'"):
        request.lora_tags()
