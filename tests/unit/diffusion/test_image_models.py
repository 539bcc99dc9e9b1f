"""Upscaler checkpoints read through spandrel, on a machine without torchvision."""

import importlib.util
import sys

import pytest
import torch
from safetensors.torch import save_file

from diffusion.image_models import UnsupportedImageModel, import_spandrel, load_image_model

needs_no_torchvision = pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed: spandrel uses it"
)


@needs_no_torchvision
def test_spandrel_imports_without_torchvision_and_leaves_none_behind():
    spandrel = import_spandrel()
    assert "torchvision" not in sys.modules
    assert importlib.util.find_spec("torchvision") is None
    assert {"ESRGAN", "Compact", "SwinIR", "HAT", "DAT", "GFPGAN"} <= {
        support.architecture.id for support in spandrel.MAIN_REGISTRY
    }


@needs_no_torchvision
def test_the_two_architectures_that_need_torchvision_say_so_when_they_run():
    import_spandrel()
    restoreformer = sys.modules["spandrel.architectures.RestoreFormer"]
    with pytest.raises(ModuleNotFoundError, match="torchvision is not installed"):
        restoreformer.tv_normalize(torch.zeros(1, 3, 2, 2), [0.5] * 3, [0.5] * 3)


@pytest.mark.parametrize(("fixture", "architecture"), [("upscaler", "Compact"), ("esrgan_upscaler", "ESRGAN")])
def test_an_upscaler_file_is_recognised_from_its_weights(request, fixture, architecture):
    model = load_image_model(request.getfixturevalue(fixture), device=torch.device("cpu"))
    assert (model.architecture.id, model.scale, model.purpose) == (architecture, 2, "SR")
    assert model(torch.rand(1, 3, 10, 12)).shape == (1, 3, 20, 24)


def test_a_file_that_is_no_image_model_is_refused_by_name(tmp_path):
    path = tmp_path / "mystery.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(UnsupportedImageModel, match="mystery.safetensors is not an image model"):
        load_image_model(path, device=torch.device("cpu"))
