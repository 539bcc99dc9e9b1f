"""Background removal: rembg's pre- and post-processing, model lookup, and the tiny U^2-Net-shaped
ONNX model run end to end."""

import base64
import io
import shutil

import numpy as np
import pytest
from PIL import Image

from services.inference.worker.engine.rembg import (
    BIREFNET,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ISNET,
    U2NET,
    BackgroundRemover,
    RembgRequest,
    UnknownRembgModel,
    family_of,
    find_model,
    mask_from_output,
    model_input,
    naive_cutout,
)
from services.inference.worker.engine.request import InvalidPayload


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_models_are_run_as_rembg_runs_their_family():
    assert [family_of(name) for name in ("u2net", "u2netp", "u2net_human_seg", "silueta")] == [U2NET] * 4
    assert family_of("isnet-general-use") is ISNET and family_of("isnet-anime") is ISNET
    assert family_of("birefnet-portrait") is BIREFNET and BIREFNET.sigmoid
    assert (U2NET.size, ISNET.size, ISNET.std) == (320, 1024, (1.0, 1.0, 1.0))
    assert family_of("3f2a-u2netp") is U2NET  # a file named after its family
    with pytest.raises(InvalidPayload, match="u2net_cloth_seg is not supported: it predicts three garment masks"):
        family_of("u2net_cloth_seg")
    with pytest.raises(InvalidPayload, match="cannot tell how to run 'mystery'"):
        family_of("mystery")


def test_the_input_is_the_resized_image_scaled_by_its_maximum_and_normalised():
    image = Image.new("RGB", (50, 30), (255, 255, 255))
    tensor = model_input(image, U2NET)
    assert (tensor.shape, tensor.dtype) == ((1, 3, 320, 320), np.float32)
    expected = (1.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert np.allclose(tensor[0, :, 0, 0], expected, atol=1e-6)
    # divided by the image's maximum, not by 255: a dark image fills the range too
    dark = model_input(Image.new("RGB", (50, 30), (100, 100, 100)), ISNET)
    assert dark.shape == (1, 3, 1024, 1024)
    assert np.allclose(dark[0, :, 0, 0], 1.0 - np.array(IMAGENET_MEAN), atol=1e-6)


def test_the_mask_is_the_first_channel_stretched_to_its_range_at_the_images_size():
    output = np.zeros((1, 2, 4, 4), dtype=np.float32)
    output[0, 0] = np.linspace(0.2, 0.6, 16).reshape(4, 4)
    output[0, 1] = 5.0  # other channels are not the mask
    mask = mask_from_output(output, (8, 6), U2NET)
    assert (mask.mode, mask.size) == ("L", (8, 6))
    small = np.asarray(mask_from_output(output, (4, 4), U2NET))
    assert (small.min(), small.max()) == (0, 255)
    # logits go through a sigmoid first; min-max keeps the order
    logits = np.asarray(mask_from_output(output * 10 - 4, (4, 4), BIREFNET), dtype=int).ravel()
    order = np.argsort(output[0, 0], axis=None)
    assert (np.diff(logits[order]) >= 0).all() and (logits.min(), logits.max()) == (0, 255)
    flat = np.asarray(mask_from_output(np.ones((1, 1, 4, 4)), (4, 4), U2NET))
    assert (flat == 0).all()  # no foreground to tell, and no division by zero


def test_the_cutout_takes_its_alpha_from_the_mask():
    image = Image.new("RGB", (2, 1), (200, 100, 50))
    mask = Image.fromarray(np.array([[255, 0]], dtype=np.uint8), mode="L")
    cutout = naive_cutout(image, mask)
    assert cutout.mode == "RGBA"
    assert np.asarray(cutout).tolist() == [[[200, 100, 50, 255], [0, 0, 0, 0]]]


def test_models_come_from_the_job_and_the_folder_and_an_unknown_one_names_them(tmp_path, rembg_model):
    folder = tmp_path / "rembg"
    folder.mkdir()
    shutil.copy(rembg_model, folder / "silueta.onnx")
    job = {"u2netp.onnx": rembg_model}
    assert find_model("u2netp", job, folder) == rembg_model
    assert find_model("Silueta", job, folder) == folder / "silueta.onnx"
    with pytest.raises(UnknownRembgModel, match="rembg model 'u2net' is not available; available: u2netp, silueta"):
        find_model("u2net", job, folder)
    with pytest.raises(UnknownRembgModel, match="available: none"):
        find_model("u2net", {}, None)


def test_the_request_is_the_rembg_extensions_body():
    request = RembgRequest.from_payload({"input_image": b64(noise(8, 8)), "alpha_matting": None, "extra": 1})
    assert (request.model, request.return_mask, request.alpha_matting) == ("u2net", False, False)
    assert request.alpha_matting_foreground_threshold == 240
    with pytest.raises(InvalidPayload, match="input_image: the rembg payload needs it"):
        RembgRequest.from_payload({"model": "u2net"})
    with pytest.raises(InvalidPayload, match="alpha_matting_background_threshold"):
        RembgRequest.from_payload({"input_image": b64(noise(8, 8)), "alpha_matting_background_threshold": 300})


def test_the_tiny_model_cuts_out_an_rgba_image_or_gives_its_mask(rembg_model):
    remover = BackgroundRemover()
    source = noise(90, 60)
    job = {"u2netp.onnx": rembg_model}
    cutout = Image.open(
        io.BytesIO(remover.run(RembgRequest(input_image=b64(source), model="u2netp"), job).images[0].png)
    )
    result = remover.run(RembgRequest(input_image=b64(source), model="u2netp", return_mask=True), job)
    mask = Image.open(io.BytesIO(result.images[0].png))
    assert (cutout.mode, cutout.size) == ("RGBA", (90, 60))
    assert (mask.mode, mask.size) == ("L", (90, 60))
    assert np.array_equal(np.asarray(cutout)[:, :, 3], np.asarray(mask))
    assert result.info["model_family"] == "U^2-Net" and remover.loads == 1
    other = remover.run(RembgRequest(input_image=b64(noise(90, 60, seed=5)), model="u2netp", return_mask=True), job)
    assert other.images[0].png != result.images[0].png  # the mask depends on the image


def test_alpha_matting_fails_clearly_until_it_is_built(rembg_model):
    with pytest.raises(InvalidPayload, match="alpha_matting: alpha matting is not supported"):
        BackgroundRemover().run(
            RembgRequest(input_image=b64(noise(16, 16)), model="u2netp", alpha_matting=True),
            {"u2netp.onnx": rembg_model},
        )
