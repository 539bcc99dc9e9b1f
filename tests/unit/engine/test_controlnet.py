"""ControlNet units in A1111's `alwayson_scripts`: parsed as the extension takes them,
preprocessed, and steering generation on SD 1.x and SDXL."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image, ImageChops

from services.inference.worker.engine import (
    Engine,
    GenerationRequest,
    IncompatibleModel,
    InvalidPayload,
    ModelFiles,
)
from services.inference.worker.engine.controlnet import (
    ControlMode,
    ResizeMode,
    control_scales,
    detect,
    fit,
    parse_units,
)


def _base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _square(size: int = 64) -> Image.Image:
    """A black square on white: edges a canny detector finds."""
    pixels = np.full((size, size, 3), 255, dtype=np.uint8)
    pixels[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 0
    return Image.fromarray(pixels)


IMAGE = _base64(_square())


def test_units_are_read_as_the_extension_sends_them():
    units = parse_units(
        {
            "controlnet": {
                "args": [
                    {
                        "enabled": True,
                        "module": "canny",
                        "model": "control_v11p_sd15_canny [d14c016b]",
                        "weight": 0.8,
                        "image": IMAGE,
                        "resize_mode": 0,
                        "control_mode": 2,
                        "processor_res": 256,
                        "threshold_a": 50,
                        "threshold_b": -1,
                        "guidance_start": 0.1,
                        "guidance_end": 0.9,
                        "pixel_perfect": False,
                        "low_vram": False,
                    },
                    {"enabled": False, "module": "depth_midas", "model": "None"},  # skipped: disabled
                    None,
                    {
                        "module": "invert (from white bg & black line)",
                        "model": "control_v11p_sd15_lineart",
                        "input_image": {"image": IMAGE, "mask": None},
                        "resize_mode": "Resize and Fill",
                        "control_mode": "My prompt is more important",
                        "guidance": 0.5,
                    },
                ]
            }
        }
    )
    assert len(units) == 2
    first, second = units
    assert first.model_name == "control_v11p_sd15_canny" and first.module == "canny"
    assert (first.resize_mode, first.control_mode) == (ResizeMode.JUST_RESIZE, ControlMode.CONTROL)
    assert first.settings() == (256, 50.0, 200.0)  # negative: the preprocessor's default
    assert (first.weight, first.guidance_start, first.guidance_end) == (0.8, 0.1, 0.9)
    assert second.module == "invert" and second.image == IMAGE and second.guidance_end == 0.5
    assert (second.resize_mode, second.control_mode) == (ResizeMode.RESIZE_AND_FILL, ControlMode.PROMPT)
    assert parse_units({"ControlNet": {"args": [{"model": "x", "image": IMAGE}]}})[0].model_name == "x"
    assert parse_units({}) == [] and parse_units({"controlnet": {"args": []}}) == []


@pytest.mark.parametrize(
    ("unit", "message"),
    [
        ({"module": "depth_midas", "model": "m"}, r"args\[0\]: module: unknown preprocessor 'depth_midas'; .*canny"),
        ({"model": "m", "resize_mode": 7}, r"resize_mode: resize mode 7 is not 0, 1 or 2"),
        ({"model": "m", "control_mode": "Loud"}, r"control_mode: unknown control mode 'Loud'"),
        ({"model": "m", "guidance_start": 0.6, "guidance_end": 0.4}, r"guidance_start \(0.6\) must be below"),
        ({"model": "None"}, r"an enabled unit must name a ControlNet model"),
        ({"model": "m", "image": "not an image"}, r"image: not a base64-encoded PNG or JPEG image"),
        ({"model": "m", "weight": -1}, r"weight: Input should be greater than or equal to 0"),
    ],
)
def test_a_bad_unit_fails_the_request_with_its_place(unit, message):
    with pytest.raises(InvalidPayload, match=r"^invalid|alwayson_scripts\.controlnet\.args\[0\]") as caught:
        GenerationRequest.from_payload("txt2img", {"alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert caught.match(message)


def test_preprocessors():
    square = _square(64)
    canny = parse_units({"controlnet": {"args": [{"model": "m", "module": "canny", "processor_res": 64}]}})[0]
    edges = detect(canny, square, 64, 64)
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    assert edges[32, 16].max() == 255 or edges[32, 15].max() == 255  # the square's left side
    assert edges[32, 32].max() == 0 and edges[2, 2].max() == 0
    invert = parse_units({"controlnet": {"args": [{"model": "m", "module": "invert"}]}})[0]
    assert (detect(invert, square, 64, 64) == 255 - np.asarray(square)).all()
    binary = parse_units({"controlnet": {"args": [{"model": "m", "module": "binary", "processor_res": 64}]}})[0]
    # dark becomes white (the extension inverts), by Otsu's threshold
    assert detect(binary, square, 64, 64)[32, 32].tolist() == [255, 255, 255]
    none = parse_units({"controlnet": {"args": [{"model": "m"}]}})[0]
    assert (detect(none, square, 64, 64) == np.asarray(square)).all()


def test_maps_are_fitted_to_the_generation_size():
    wide = np.zeros((50, 100, 3), dtype=np.uint8)
    wide[:, :50] = 200
    assert fit(wide, ResizeMode.JUST_RESIZE, 64, 64).size == (64, 64)
    cropped = np.asarray(fit(wide, ResizeMode.CROP_AND_RESIZE, 64, 64))
    assert cropped.shape == (64, 64, 3)
    assert cropped[:, 0].mean() == 200 and cropped[:, -1].mean() == 0  # the centre of the wide map
    filled = np.asarray(fit(wide, ResizeMode.RESIZE_AND_FILL, 64, 64))
    assert filled.shape == (64, 64, 3) and filled[:8].std() == 0  # bands of the border's colour


def test_control_modes_scale_the_residuals_as_the_extension():
    assert control_scales(ControlMode.BALANCED, 13, hires=False) == [1.0] * 13
    graded = control_scales(ControlMode.PROMPT, 13, hires=False)
    assert graded[-1] == 1.0 and graded[0] == pytest.approx(0.825**12)
    assert control_scales(ControlMode.BALANCED, 13, hires=True) == graded
    assert control_scales(ControlMode.CONTROL, 10, hires=False) == graded[:10]  # SDXL's 10 residuals


SMALL = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "steps": 3, "width": 64, "height": 64, "seed": 4}


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine()


def _unit(**overrides) -> dict:
    return {"enabled": True, "module": "canny", "model": "control_tiny_canny [0123abcd]", "image": IMAGE, **overrides}


def _generate(engine, models, task="txt2img", units=None, **payload) -> list[Image.Image]:
    body = {**SMALL, **payload}
    if units is not None:
        body["alwayson_scripts"] = {"controlnet": {"args": units}}
    result = engine.generate(GenerationRequest.from_payload(task, body), models)
    images = []
    for data in result.images:
        image = Image.open(io.BytesIO(data))
        image.load()
        images.append(image)
    return images


def _difference(first: Image.Image, second: Image.Image) -> int:
    return max(high for _, high in ImageChops.difference(first.convert("RGB"), second.convert("RGB")).getextrema())


@pytest.fixture
def models(checkpoint, controlnet):
    return ModelFiles(checkpoint=checkpoint, controlnets={"control_tiny_canny": controlnet})


def test_a_controlnet_unit_steers_the_image_and_weight_0_steers_nothing(engine, models):
    plain = _generate(engine, models)[0]
    steered = _generate(engine, models, units=[_unit()])[0]
    nothing = _generate(engine, models, units=[_unit(weight=0)])[0]
    disabled = _generate(engine, models, units=[_unit(enabled=False)])[0]
    assert _difference(plain, steered) > 10
    assert _difference(plain, nothing) == 0
    assert _difference(plain, disabled) == 0
    text = steered.text["parameters"]
    assert 'ControlNet 0: "Module: canny, Model: control_tiny_canny, Weight: 1, Resize Mode: Crop and Resize' in text


def test_units_combine_and_their_settings_matter(engine, models):
    one = _generate(engine, models, units=[_unit()])[0]
    two = _generate(engine, models, units=[_unit(), _unit(module="invert", weight=0.5)])[0]
    late = _generate(engine, models, units=[_unit(guidance_start=0.5)])[0]
    prompt_first = _generate(engine, models, units=[_unit(control_mode="My prompt is more important")])[0]
    control_first = _generate(engine, models, units=[_unit(control_mode=2)])[0]
    images = [one, two, late, prompt_first, control_first]
    for index, image in enumerate(images):
        for other in images[index + 1 :]:
            assert _difference(image, other) > 0
    assert "ControlNet 1: " in two.text["parameters"]


def test_controlnet_in_img2img_uses_the_init_image_and_with_hires(engine, models):
    init = _base64(Image.new("RGB", (64, 64), (30, 120, 200)))
    plain = _generate(engine, models, task="img2img", init_images=[init], denoising_strength=0.7)[0]
    steered = _generate(
        engine, models, task="img2img", units=[_unit(image=None)], init_images=[init], denoising_strength=0.7
    )[0]
    assert _difference(plain, steered) > 0
    hires = _generate(engine, models, units=[_unit()], enable_hr=True, hr_scale=1.5, batch_size=2)
    assert [image.size for image in hires] == [(96, 96), (96, 96)]


def test_a_unit_without_an_image_in_txt2img_is_refused(engine, models):
    with pytest.raises(InvalidPayload, match=r"args\[0\]: the unit has no image"):
        _generate(engine, models, units=[_unit(image=None)])


def test_an_unknown_controlnet_names_the_jobs_ones(engine, models):
    with pytest.raises(InvalidPayload, match=r"ControlNet 'control_v11p_sd15_depth' is not among .*control_tiny_canny"):
        _generate(engine, models, units=[_unit(model="control_v11p_sd15_depth [fefefefe]")])


def test_a_controlnet_of_the_other_family_is_refused(engine, checkpoint, sdxl_checkpoint, controlnet, sdxl_controlnet):
    mixed = ModelFiles(checkpoint=checkpoint, controlnets={"control_tiny_sdxl": sdxl_controlnet})
    with pytest.raises(IncompatibleModel, match="is an SDXL ControlNet and cannot steer this SD 1.x checkpoint"):
        _generate(engine, mixed, units=[_unit(model="control_tiny_sdxl")])
    reverse = ModelFiles(checkpoint=sdxl_checkpoint, controlnets={"control_tiny_canny": controlnet})
    with pytest.raises(IncompatibleModel, match="is an SD 1.x ControlNet and cannot steer this SDXL checkpoint"):
        _generate(engine, reverse, units=[_unit()])


def test_sdxl_controlnet(engine, sdxl_checkpoint, sdxl_controlnet):
    models = ModelFiles(checkpoint=sdxl_checkpoint, controlnets={"control_tiny_sdxl": sdxl_controlnet})
    plain = _generate(engine, models)[0]
    steered = _generate(engine, models, units=[_unit(model="control_tiny_sdxl")])[0]
    assert steered.size == (64, 64) and _difference(plain, steered) > 0


def test_a_controlnet_is_read_once(checkpoint, controlnet):
    engine = Engine()
    models = ModelFiles(checkpoint=checkpoint, controlnets={"control_tiny_canny": controlnet})
    for _ in range(2):
        _generate(engine, models, units=[_unit()], steps=1)
    assert (engine.loads, engine.controlnet_loads) == (1, 1)
