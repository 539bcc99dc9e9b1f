"""The image generation engine the inference worker calls: AUTOMATIC1111-style requests run
on diffusers pipelines assembled from single-file checkpoints (read by the shared `diffusion`
package), with no Hugging Face hub access.

    engine = Engine(device="cuda")
    request = GenerationRequest.from_payload("txt2img", payload)
    result = engine.generate(request, ModelFiles(checkpoint=path), progress=report)

Besides the basics it honours what A1111 API users send: prompt weights and BREAK
(`prompts`), the hires fix (`hires`), ControlNet units in `alwayson_scripts` (`controlnet`)
and `override_settings` (checkpoint, VAE, clip skip, ENSD). The same workers run the extras
(`Extras`: upscalers found by name in `Upscalers`, each an `upscale(image, target) -> image`,
which the hires fix uses too) and background removal (`BackgroundRemover`, rembg's models on
onnxruntime).

A user's mistake (a bad payload, an unknown sampler or upscaler, a checkpoint, LoRA,
embedding or ControlNet that does not fit) raises a `shared.errors.Invalid` whose message is
meant for the user; anything else is a bug or a broken installation.
"""

from diffusion.checkpoints import UnsupportedCheckpoint
from diffusion.tokenizers import TokenizerUnavailable
from services.inference.worker.engine.engine import (
    Engine,
    GenerationCancelled,
    GenerationResult,
    IncompatibleModel,
    ModelFiles,
    Preview,
)
from services.inference.worker.engine.extras import Extras, ExtrasModels, ExtrasRequest, FaceRestorationUnavailable
from services.inference.worker.engine.outputs import ImagesResult, NamedImage
from services.inference.worker.engine.rembg import BackgroundRemover, RembgRequest, UnknownRembgModel
from services.inference.worker.engine.request import GenerationRequest, InvalidPayload
from services.inference.worker.engine.samplers import UnknownSampler
from services.inference.worker.engine.upscalers import UnknownUpscaler, Upscale, Upscalers

__all__ = [
    "BackgroundRemover",
    "Engine",
    "Extras",
    "ExtrasModels",
    "ExtrasRequest",
    "FaceRestorationUnavailable",
    "ImagesResult",
    "NamedImage",
    "RembgRequest",
    "UnknownRembgModel",
    "Upscale",
    "Upscalers",
    "GenerationCancelled",
    "GenerationRequest",
    "GenerationResult",
    "IncompatibleModel",
    "InvalidPayload",
    "ModelFiles",
    "Preview",
    "TokenizerUnavailable",
    "UnknownSampler",
    "UnknownUpscaler",
    "UnsupportedCheckpoint",
]
