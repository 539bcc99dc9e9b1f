"""Upscalers by name, and tiled upscaling."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.image_models import UnsupportedImageModel, load_image_model
from diffusion.testing import tiny_upscaler_model
from services.inference.worker.engine.upscalers import (
    BUILT_IN,
    ModelUpscaler,
    UnknownUpscaler,
    Upscalers,
    blend_margin,
    tile_starts,
    tiled,
)


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(("length", "tile", "overlap"), [(100, 32, 8), (33, 32, 8), (64, 32, 0), (500, 256, 32)])
def test_tiles_cover_the_axis_and_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == length
    for before, after in zip(starts, starts[1:], strict=False):
        assert before + tile - after >= overlap  # consecutive tiles share at least `overlap`
    assert tile_starts(20, 32, 8) == [0]  # smaller than a tile: one piece


def test_a_tiled_upscale_equals_an_untiled_one_when_the_model_sees_within_the_overlap():
    # the compact net sees 4 pixels around each pixel (4 convolutions of 3x3); an overlap of 16
    # keeps 4 pixels at each inner edge out of the blend
    model = tiny_upscaler_model("compact", scale=2)
    assert blend_margin(16) == 4
    image = torch.rand(1, 3, 70, 90, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        whole = model(image)
        pieces = tiled(model, image, scale=2, tile=32, overlap=16)
        seams = tiled(model, image, scale=2, tile=32, overlap=0)
    assert pieces.shape == whole.shape == (1, 3, 140, 180)
    assert torch.allclose(pieces, whole, atol=1e-5)
    # without an overlap the tiles' edges show (which is why there is one)
    assert not torch.allclose(seams, whole, atol=1e-3)


def test_tiles_of_the_whole_image_run_it_once():
    calls = []

    def model(piece):
        calls.append(piece.shape)
        return piece.repeat_interleave(2, 2).repeat_interleave(2, 3)

    tiled(model, torch.rand(1, 3, 20, 30), scale=2, tile=0, overlap=8)
    tiled(model, torch.rand(1, 3, 20, 30), scale=2, tile=32, overlap=8)
    assert calls == [(1, 3, 20, 30)] * 2


def test_built_in_upscalers_resize_to_the_target():
    upscalers = Upscalers()
    image = noise(16, 12)
    for name in ("None", "lanczos", "Nearest"):
        assert upscalers.find(name, {})(image, (40, 24)).size == (40, 24)
    nearest = np.asarray(BUILT_IN["Nearest"](image, (32, 24)))
    assert (nearest[::2, ::2] == np.asarray(image)).all()


def test_a_model_upscaler_is_found_by_file_name_or_stem_and_loaded_once(upscaler):
    upscalers = Upscalers(tile_size=16, tile_overlap=8)
    models = {"2x-tiny-compact.pth": upscaler}
    first = upscalers.find("2x-tiny-compact", models)
    second = upscalers.find("2x-tiny-compact.pth", models)
    assert upscalers.loads == 1
    image = noise(24, 16)
    # a 2x model reaches 4x in two passes; a target in between is resized from the pass above it
    assert first(image, (96, 64)).size == (96, 64)
    assert second(image, (40, 24)).size == (40, 24)
    # the output is the model's, not a resize: it depends on the input
    assert first(image, (48, 32)).tobytes() != first(noise(24, 16, seed=2), (48, 32)).tobytes()
    assert first(image, (48, 32)).tobytes() != BUILT_IN["Lanczos"](image, (48, 32)).tobytes()


def test_an_unknown_upscaler_names_the_ones_available(upscaler):
    with pytest.raises(
        UnknownUpscaler, match="'R-ESRGAN 4x\\+' is not available; this job can use None, Lanczos, Nearest, 2x-tiny"
    ):
        Upscalers().find("R-ESRGAN 4x+", {"2x-tiny.pth": upscaler})


def test_an_upscaler_that_does_not_take_rgb_is_refused(upscaler):
    descriptor = load_image_model(upscaler, device=torch.device("cpu"))
    four_channels = type("Descriptor", (), {"input_channels": 4, "scale": 2, "tiling": descriptor.tiling})()
    with pytest.raises(UnsupportedImageModel, match="takes 4 channels"):
        ModelUpscaler("rgba", four_channels, tile_size=16, tile_overlap=4)
