"""The image generation engine the inference worker calls: AUTOMATIC1111-style requests run
on diffusers pipelines loaded from single-file checkpoints, with no Hugging Face hub access.

    engine = Engine(device="cuda")
    request = GenerationRequest.from_payload("txt2img", payload)
    result = engine.generate(request, ModelFiles(checkpoint=path), progress=report)
"""

from services.inference.worker.engine.engine import (
    Engine,
    GenerationCancelled,
    GenerationResult,
    ModelFiles,
)
from services.inference.worker.engine.loading import UnsupportedCheckpoint
from services.inference.worker.engine.request import GenerationRequest
from services.inference.worker.engine.tokenizer import TokenizerUnavailable

__all__ = [
    "Engine",
    "GenerationCancelled",
    "GenerationRequest",
    "GenerationResult",
    "ModelFiles",
    "TokenizerUnavailable",
    "UnsupportedCheckpoint",
]
