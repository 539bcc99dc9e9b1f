"""Image-to-image models (upscalers such as ESRGAN, RealESRGAN, SwinIR, HAT, DAT; face
restorers such as GFPGAN) loaded from a checkpoint file through spandrel, which recognises the
architecture and its hyperparameters from the weights alone.

    model = load_image_model(Path("4x-UltraSharp.pth"), device=torch.device("cuda"))
    model.scale, model.purpose            # 4, "SR"
    output = model(tensor)                # (1, 3, H, W) in [0, 1] -> (1, 3, 4H, 4W)

spandrel without torchvision: spandrel imports all its architectures when it is imported, and
two of them import torchvision at module level for functions they call only while running:
LaMa (an inpainting model: `rotate`, `InterpolationMode`) and RestoreFormer (a face restorer:
`normalize`). torchvision is not a dependency here (installing it would replace the pinned
torch). So while spandrel is imported, and only then, a stand-in `torchvision.transforms.
functional` holding exactly those three names is put in `sys.modules`; each raises a clear
error when used. The stand-in is removed right after the import, so nothing else can see a
torchvision. Every other architecture (the ESRGAN family, Compact, SwinIR, HAT, DAT, SCUNet,
GFPGAN, ...) is spandrel's own code, untouched. When torchvision is installed it is used.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import torch

from diffusion.checkpoints import UnsupportedCheckpoint, read_state_dict
from shared.errors import Invalid

# what spandrel's LaMa and RestoreFormer modules take from torchvision at import time
_TORCHVISION_NAMES = ("InterpolationMode", "rotate", "normalize")
_STANDIN_MODULES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


class UnsupportedImageModel(Invalid):
    """The file is not a model spandrel knows, or not one that maps an image to an image."""


def _missing(name: str):
    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise ModuleNotFoundError(
            f"this model needs torchvision.transforms.functional.{name}, and torchvision is not installed"
        )

    unavailable.__name__ = name
    return unavailable


def _torchvision_standin() -> dict[str, types.ModuleType]:
    package = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    for name in _TORCHVISION_NAMES:
        setattr(functional, name, _missing(name))
    package.transforms = transforms  # type: ignore[attr-defined]
    transforms.functional = functional  # type: ignore[attr-defined]
    return dict(zip(_STANDIN_MODULES, (package, transforms, functional), strict=True))


def import_spandrel() -> types.ModuleType:
    """spandrel, imported with torchvision when it is installed, else with the stand-in above
    for the duration of the import."""
    if "spandrel" in sys.modules:
        return sys.modules["spandrel"]
    if importlib.util.find_spec("torchvision") is not None:
        return importlib.import_module("spandrel")
    standin = _torchvision_standin()
    sys.modules.update(standin)
    try:
        return importlib.import_module("spandrel")
    finally:
        for name, module in standin.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


def load_image_model(path: Path, *, device: torch.device, half: bool = False):
    """The spandrel `ImageModelDescriptor` of a checkpoint file, in eval mode on `device`
    (in float16 when `half` and the architecture supports it)."""
    spandrel = import_spandrel()
    # read as every checkpoint is (safetensors, or a pickle with `weights_only`): spandrel's
    # own reader tries a `.pt` as TorchScript first and unpickles with a filter of its own
    try:
        state = read_state_dict(path)
    except UnsupportedCheckpoint as error:
        raise UnsupportedImageModel(error.message) from None
    try:
        descriptor = spandrel.ModelLoader(device=device).load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        raise UnsupportedImageModel(
            f"{path.name} is not an image model this platform recognises (spandrel knows: "
            f"{', '.join(sorted(arch.architecture.name for arch in spandrel.MAIN_REGISTRY))})"
        ) from None
    except (ValueError, RuntimeError, KeyError, OSError) as error:
        raise UnsupportedImageModel(f"{path.name} could not be read as an image model: {error}") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise UnsupportedImageModel(
            f"{path.name} is a {descriptor.architecture.name} model ({descriptor.purpose}), not one that maps an image to an image"
        )
    if half and descriptor.supports_half:
        descriptor.half()
    return descriptor.eval()
