"""The engine's tests run on the tiny models, offline."""

from tests.unit.tiny_models import (  # noqa: F401 (fixtures)
    checkpoint,
    controlnet,
    embedding,
    esrgan_upscaler,
    lora,
    model_dir,
    no_network,
    other_checkpoint,
    rembg_model,
    sdxl_checkpoint,
    sdxl_controlnet,
    sdxl_lora,
    upscaler,
    vae,
)
