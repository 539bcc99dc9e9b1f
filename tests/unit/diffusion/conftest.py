"""The shared torch side's tests run on the tiny models, offline."""

from tests.unit.tiny_models import (  # noqa: F401 (fixtures)
    checkpoint,
    controlnet,
    esrgan_upscaler,
    model_dir,
    no_network,
    sdxl_checkpoint,
    sdxl_controlnet,
    upscaler,
    vae,
)
