"""The extras: AUTOMATIC1111's extra-single-image / extra-batch-images bodies, sizes, crops and
blends, on built-in upscalers and the tiny model upscaler."""

import base64
import io

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from services.inference.worker.engine.extras import (
    Extras,
    ExtrasModels,
    ExtrasRequest,
    FaceRestorationUnavailable,
    centre_crop,
    plan_upscale,
)
from services.inference.worker.engine.outputs import output_names
from services.inference.worker.engine.request import InvalidPayload
from services.inference.worker.engine.upscalers import UnknownUpscaler, Upscalers


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def b64(image: Image.Image, **png_texts: str) -> str:
    info = PngImagePlugin.PngInfo()
    for key, value in png_texts.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


def single(**body) -> ExtrasRequest:
    return ExtrasRequest.from_payload("extra-single-image", {"image": b64(noise(64, 48)), **body})


def opened(result, index: int = 0) -> Image.Image:
    return Image.open(io.BytesIO(result.images[index].png))


# --- the request ---------------------------------------------------------------------------


def test_a_request_takes_a1111_defaults_and_ignores_what_it_does_not_know():
    request = single(upscaler_1="Lanczos", sampler_name="Euler", upscaling_resize=None)
    assert (request.resize_mode, request.upscaling_resize, request.upscaling_crop) == (0, 2.0, True)
    assert (request.upscaler_2, request.extras_upscaler_2_visibility) == ("None", 0.0)
    assert len(request.inputs()) == 1


@pytest.mark.parametrize(
    ("task", "body", "message"),
    [
        ("extra-single-image", {}, "image: extra-single-image needs an image"),
        ("extra-single-image", {"image": "not an image"}, "image: not a base64-encoded PNG or JPEG image"),
        ("extra-batch-images", {}, "imageList: extra-batch-images needs at least one image"),
        ("extra-batch-images", {"imageList": [{"data": "???", "name": "a.png"}]}, "imageList: image 0: not a base64"),
        ("extra-single-image", {"image": "x", "upscaling_resize": 9}, "upscaling_resize: Input should be less than"),
        ("extra-single-image", {"image": "x", "resize_mode": 2}, "resize_mode"),
        ("extra-single-image", [1, 2], "must be a JSON object"),
    ],
)
def test_a_bad_request_names_the_field(task, body, message):
    if isinstance(body, dict) and body.get("image") == "x":
        body = {**body, "image": b64(noise(8, 8))}
    with pytest.raises(InvalidPayload, match=message):
        ExtrasRequest.from_payload(task, body)


def test_a_batch_keeps_each_images_name():
    request = ExtrasRequest.from_payload(
        "extra-batch-images",
        {"imageList": [{"data": b64(noise(8, 8)), "name": "cat.jpg"}, {"data": b64(noise(8, 8, 1))}]},
    )
    assert [name for _, name in request.inputs()] == ["cat.jpg", None]


def test_output_names_are_safe_pngs_without_repeats():
    assert output_names(["cat.jpg", "cat.png", None, "../up/dog.webp", "x:/y?.png", ".."]) == [
        "cat.png",
        "cat-1.png",
        "image_2.png",
        "dog.png",
        "y_.png",
        "image_5.png",
    ]


# --- sizes ---------------------------------------------------------------------------------


def test_a_factor_gives_the_size_rounded_down_to_a_multiple_of_8():
    assert plan_upscale((64, 48), single(upscaling_resize=2)).target == (128, 96)
    assert plan_upscale((100, 75), single(upscaling_resize=1.5)).target == (144, 112)
    assert plan_upscale((64, 48), single(upscaling_resize=2)).crop is None


def test_a_size_takes_the_factor_that_covers_it_and_crops_to_it():
    plan = plan_upscale((64, 48), single(resize_mode=1, upscaling_resize_w=100, upscaling_resize_h=100))
    assert plan.factor == pytest.approx(100 / 48)
    assert plan.target == (128, 96)  # 133.3 x 100, rounded down to multiples of 8
    assert plan.crop == (100, 100)
    uncropped = plan_upscale(
        (64, 48), single(resize_mode=1, upscaling_resize_w=100, upscaling_resize_h=100, upscaling_crop=False)
    )
    assert (uncropped.target, uncropped.crop) == ((128, 96), None)


def test_sizes_out_of_range_are_refused():
    with pytest.raises(InvalidPayload, match="under 8 pixels"):
        plan_upscale((3, 3), single(upscaling_resize=2))
    with pytest.raises(InvalidPayload, match="over 16384 pixels"):
        plan_upscale((4000, 3000), single(upscaling_resize=8))


def test_an_output_may_hold_four_times_the_pixels_an_input_may(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    assert plan_upscale((1000, 1000), single(upscaling_resize=2)).target == (2000, 2000)
    with pytest.raises(InvalidPayload, match=r"would be 2008x2008, over 4000000 pixels \(4 x ESD_MAX_IMAGE_PIXELS\)"):
        plan_upscale((1004, 1004), single(upscaling_resize=2))


def test_the_crop_centres_the_image_on_the_asked_canvas():
    cropped = np.asarray(centre_crop(Image.new("RGB", (128, 96), "white"), (100, 100)))
    assert cropped.shape == (100, 100, 3)
    assert (cropped[:2] == 0).all() and (cropped[-2:] == 0).all()  # 96 rows on 100: black bands
    assert (cropped[2:98] == 255).all()  # 128 columns on 100: cut


# --- running -------------------------------------------------------------------------------


def test_upscaling_with_the_model_gives_the_factors_size_in_rgb(upscaler):
    extras = Extras(Upscalers(tile_size=32, tile_overlap=8))
    source = noise(64, 48)
    request = ExtrasRequest.from_payload(
        "extra-single-image", {"image": b64(source.convert("RGBA")), "upscaler_1": "2x-tiny-compact"}
    )
    result = extras.run(request, ExtrasModels(upscalers={"2x-tiny-compact.pth": upscaler}))
    image = opened(result)
    assert (image.size, image.mode) == ((128, 96), "RGB")
    assert result.images[0].name == "image_0.png"
    assert image.info["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: 2x-tiny-compact"
    assert result.info["sizes"] == [[128, 96]]
    assert "image" not in result.parameters and result.parameters["upscaler_1"] == "2x-tiny-compact"


def test_the_second_upscaler_is_blended_in_by_its_visibility():
    extras = Extras(Upscalers())
    source = noise(16, 16)
    body = {"image": b64(source), "upscaler_1": "Nearest", "upscaler_2": "Lanczos"}
    nearest = opened(extras.run(ExtrasRequest.from_payload("extra-single-image", body), ExtrasModels()))
    blended = opened(
        extras.run(
            ExtrasRequest.from_payload("extra-single-image", {**body, "extras_upscaler_2_visibility": 0.5}),
            ExtrasModels(),
        )
    )
    lanczos = source.resize((32, 32), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(nearest), np.asarray(source.resize((32, 32), Image.Resampling.NEAREST)))
    assert np.array_equal(np.asarray(blended), np.asarray(Image.blend(nearest, lanczos, 0.5)))
    assert "Postprocess upscaler 2: Lanczos, Postprocess upscaler 2 visibility: 0.5" in blended.info["postprocessing"]


def test_without_a_first_upscaler_the_image_is_unchanged_and_keeps_its_parameters():
    source = noise(24, 16)
    request = ExtrasRequest.from_payload(
        "extra-single-image", {"image": b64(source, parameters="a cat\nSteps: 20"), "upscaler_2": "Lanczos"}
    )
    image = opened(Extras(Upscalers()).run(request, ExtrasModels()))
    assert np.array_equal(np.asarray(image), np.asarray(source))
    assert image.info["parameters"] == "a cat\nSteps: 20"
    assert "postprocessing" not in image.info


def test_a_batch_returns_one_image_per_input_named_after_it():
    request = ExtrasRequest.from_payload(
        "extra-batch-images",
        {
            "imageList": [{"data": b64(noise(16, 8)), "name": "wide.png"}, {"data": b64(noise(8, 16)), "name": "tall"}],
            "upscaler_1": "Lanczos",
            "resize_mode": 1,
            "upscaling_resize_w": 40,
            "upscaling_resize_h": 40,
        },
    )
    result = Extras(Upscalers()).run(request, ExtrasModels())
    assert [image.name for image in result.images] == ["wide.png", "tall.png"]
    assert [opened(result, index).size for index in (0, 1)] == [(40, 40), (40, 40)]


def test_an_unknown_upscaler_fails_before_any_work():
    with pytest.raises(UnknownUpscaler, match="'SwinIR 4x' is not available"):
        Extras(Upscalers()).run(single(upscaler_1="SwinIR 4x"), ExtrasModels())


def test_face_restoration_names_what_is_missing(tmp_path):
    extras = Extras(Upscalers())
    with pytest.raises(FaceRestorationUnavailable, match='names no GFPGAN model: add one to "models"'):
        extras.run(single(gfpgan_visibility=0.5), ExtrasModels())
    with pytest.raises(FaceRestorationUnavailable, match="names no Codeformer model"):
        extras.run(single(codeformer_visibility=1), ExtrasModels())
    with pytest.raises(FaceRestorationUnavailable, match="also needs a face detector"):
        extras.run(
            single(gfpgan_visibility=0.5),
            ExtrasModels(face_restorers={"GFPGAN": {"GFPGANv1.4.pth": tmp_path / "GFPGANv1.4.pth"}}),
        )
