"""The engine generates from SDXL single-file checkpoints (txt2img, img2img, LoRA tags, samplers)
on a tiny SDXL-shaped model."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image, ImageChops

from services.inference.worker.engine import Engine, GenerationRequest, ModelFiles

SMALL = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "steps": 3, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(device="cpu")


def _png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def _difference(first: bytes, second: bytes) -> int:
    return max(high for _, high in ImageChops.difference(_png(first), _png(second)).getextrema())


def test_sdxl_txt2img_img2img_and_lora(no_network, engine, sdxl_checkpoint, sdxl_lora):
    models = ModelFiles(checkpoint=sdxl_checkpoint, loras={"style": sdxl_lora})
    plain = engine.generate(GenerationRequest.from_payload("txt2img", {**SMALL, "seed": 3}), models)
    again = engine.generate(GenerationRequest.from_payload("txt2img", {**SMALL, "seed": 3}), models)
    assert _png(plain.images[0]).size == (64, 64)
    assert _difference(plain.images[0], again.images[0]) == 0
    styled = engine.generate(
        GenerationRequest.from_payload("txt2img", {**SMALL, "seed": 3, "prompt": "a photo of a cat <lora:style:1>"}),
        models,
    )
    assert _difference(plain.images[0], styled.images[0]) > 0
    after = engine.generate(GenerationRequest.from_payload("txt2img", {**SMALL, "seed": 3}), models)
    assert _difference(plain.images[0], after.images[0]) == 0  # the LoRA was for that job only
    init = base64.b64encode(plain.images[0]).decode()
    changed = engine.generate(
        GenerationRequest.from_payload(
            "img2img", {**SMALL, "seed": 4, "init_images": [init], "denoising_strength": 0.5}
        ),
        models,
    )
    assert _png(changed.images[0]).size == (64, 64)
    assert engine.loads == 1


def test_sdxl_samplers_run(engine, sdxl_checkpoint):
    models = ModelFiles(checkpoint=sdxl_checkpoint)
    for sampler in ("DPM++ 2M", "DDIM"):
        result = engine.generate(
            GenerationRequest.from_payload("txt2img", {**SMALL, "seed": 1, "sampler_name": sampler}), models
        )
        assert _png(result.images[0]).size == (64, 64)
