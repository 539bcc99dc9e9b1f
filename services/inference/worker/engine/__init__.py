"""The image generation engine the inference worker calls: AUTOMATIC1111-style requests run
on diffusers pipelines assembled from single-file checkpoints (read by the shared `diffusion`
package), with no Hugging Face hub access.

    engine = Engine(device="cuda")
    request = GenerationRequest.from_payload("txt2img", payload)
    result = engine.generate(request, ModelFiles(checkpoint=path), progress=report)
"""

from diffusion.checkpoints import UnsupportedCheckpoint
from diffusion.tokenizers import TokenizerUnavailable
from services.inference.worker.engine.engine import (
    Engine,
    GenerationCancelled,
    GenerationResult,
    ModelFiles,
)
from services.inference.worker.engine.request import GenerationRequest

__all__ = [
    "Engine",
    "GenerationCancelled",
    "GenerationRequest",
    "GenerationResult",
    "ModelFiles",
    "TokenizerUnavailable",
    "UnsupportedCheckpoint",
]
