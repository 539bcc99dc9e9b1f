"""Each image carries A1111's `parameters` text, readable by any PNG reader."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from services.inference.worker.engine.infotext import infotext, png_with_parameters


@pytest.mark.parametrize("text", ["a cat\nSteps: 20, Seed: 1", "un chat, café ☕ 猫\nSteps: 20"])
def test_the_png_holds_the_exact_pixels_and_the_parameters(text):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(24, 40, 3), dtype=np.uint8)
    pixels[:12] = 200  # flat rows as well as noisy ones
    data = png_with_parameters(Image.fromarray(pixels), text)
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (40, 24)
    assert np.array_equal(np.asarray(image), pixels)
    assert image.text["parameters"] == text


def test_infotext_reads_like_a1111s():
    text = infotext(
        "a cat <lora:ink:1>",
        "blurry",
        {
            "Steps": 20,
            "Sampler": "DPM++ 2M",
            "Schedule type": "Karras",
            "CFG scale": 7.0,
            "VAE": None,
            "Lora weights": "ink: 1",
        },
    )
    assert text == (
        "a cat <lora:ink:1>\nNegative prompt: blurry\n"
        'Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Lora weights: "ink: 1"'
    )
    assert infotext("a cat", "", {"Steps": 4}) == "a cat\nSteps: 4"
