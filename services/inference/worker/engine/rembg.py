"""Background removal (ESD's task type `rembg`, the body of the AUTOMATIC1111 rembg extension's
`POST /rembg`): a model of the rembg family, an ONNX file run with onnxruntime, predicts a
mask of the foreground; the image is cut out with it (RGBA), or the mask itself is the result.

    request = RembgRequest.from_payload(payload)
    result = BackgroundRemover(models_dir=Path("/models/rembg")).run(request, {"u2net.onnx": path})

The pre- and post-processing are the rembg project's: the image resized (Lanczos) to the
model's square input (320 for the U^2-Net family, 1024 for IS-Net, BiRefNet and BRIA), scaled
by its maximum, normalised by the family's mean and deviation; the first output's first channel
(through a sigmoid for BiRefNet) min-max normalised to a mask, resized back with Lanczos; the
cut-out is the image composited over transparency through the mask. Alpha matting (closed-form
matting of a trimap from the mask's thresholds) is in `matting.py`.

Model files come from the job's `rembg` checkpoints and from the folder `ESD_REMBG_MODELS_DIR`
(`<model>.onnx`); nothing is downloaded.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from services.inference.worker.engine.matting import alpha_matting_cutout
from services.inference.worker.engine.outputs import ImagesResult, NamedImage, png
from services.inference.worker.engine.request import InvalidPayload, decode_image
from shared.errors import Invalid

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UnknownRembgModel(Invalid):
    """The model is neither among the job's rembg checkpoints nor in the models folder."""


@dataclass(frozen=True)
class Family:
    """How the rembg project feeds a family of models and reads their output."""

    name: str
    size: int  # the square input, in pixels
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    sigmoid: bool = False  # the output is logits


U2NET = Family("U^2-Net", 320, IMAGENET_MEAN, IMAGENET_STD)
ISNET = Family("IS-Net", 1024, IMAGENET_MEAN, (1.0, 1.0, 1.0))
BIREFNET = Family("BiRefNet", 1024, IMAGENET_MEAN, IMAGENET_STD, sigmoid=True)
BRIA = Family("BRIA RMBG", 1024, IMAGENET_MEAN, IMAGENET_STD)

# rembg's model names
FAMILIES: dict[str, Family] = {
    "u2net": U2NET,
    "u2netp": U2NET,
    "u2net_human_seg": U2NET,
    "silueta": U2NET,
    "isnet-general-use": ISNET,
    "isnet-anime": ISNET,
    "bria-rmbg": BRIA,
    **{
        f"birefnet-{kind}": BIREFNET
        for kind in ("general", "general-lite", "portrait", "dis", "hrsod", "cod", "massive")
    },
}
# rembg models that are not one mask from one image: their own pipelines are not built here
NOT_SUPPORTED = {
    "u2net_cloth_seg": "it predicts three garment masks, not one foreground",
    "sam": "it needs points or boxes as prompts",
}
# a file named otherwise is of the family its name mentions (`my-u2netp-v2.onnx`)
_NAME_HINTS = (("birefnet", BIREFNET), ("isnet", ISNET), ("bria", BRIA), ("u2net", U2NET), ("silueta", U2NET))


def family_of(model: str) -> Family:
    key = model.strip().lower()
    if key in NOT_SUPPORTED:
        raise InvalidPayload(f"model: rembg's {model} is not supported: {NOT_SUPPORTED[key]}")
    if key in FAMILIES:
        return FAMILIES[key]
    for hint, family in _NAME_HINTS:
        if hint in key:
            return family
    raise InvalidPayload(
        f"model: cannot tell how to run {model!r}: name it after its rembg model "
        f"({', '.join(sorted(FAMILIES))}) or family (u2net..., isnet..., birefnet..., bria...)"
    )


class RembgRequest(BaseModel):
    """The rembg extension's body; unknown keys are ignored."""

    model_config = ConfigDict(extra="ignore")

    input_image: str
    model: str = "u2net"
    return_mask: bool = False
    alpha_matting: bool = False
    alpha_matting_foreground_threshold: int = Field(240, ge=0, le=255)
    alpha_matting_background_threshold: int = Field(10, ge=0, le=255)
    alpha_matting_erode_size: int = Field(10, ge=0, le=1000)

    @field_validator("input_image")
    @classmethod
    def _decodes(cls, value: str) -> str:
        try:
            decode_image(value)
        except InvalidPayload as error:
            raise ValueError(error.message) from None
        return value

    @classmethod
    def from_payload(cls, payload: Any) -> RembgRequest:
        if not isinstance(payload, dict):
            raise InvalidPayload(f"the rembg payload must be a JSON object, not {type(payload).__name__}")
        payload = {key: value for key, value in payload.items() if value is not None}
        try:
            return cls.model_validate(payload)
        except ValidationError as error:
            parts = []
            for item in error.errors():
                location = ".".join(str(part) for part in item["loc"])
                message = item["msg"].removeprefix("Value error, ")
                if item["type"] == "missing":
                    message = "the rembg payload needs it (a base64 image)"
                parts.append(f"{location}: {message}" if location else message)
            raise InvalidPayload(f"invalid rembg payload: {'; '.join(parts)}") from None


# --- pre- and post-processing (rembg's) ----------------------------------------------------


def model_input(image: Image.Image, family: Family) -> np.ndarray:
    """(1, 3, size, size) float32: the image resized to the family's square, divided by its
    maximum, normalised by the family's mean and deviation."""
    resized = image.convert("RGB").resize((family.size, family.size), Image.Resampling.LANCZOS)
    pixels = np.asarray(resized, dtype=np.float64)
    pixels = pixels / max(float(pixels.max()), 1e-6)
    pixels = (pixels - np.array(family.mean)) / np.array(family.std)
    return pixels.transpose(2, 0, 1)[None].astype(np.float32)


def mask_from_output(output: np.ndarray, size: tuple[int, int], family: Family) -> Image.Image:
    """The mask (mode L, `size`) from the model's first output (N, C, h, w): channel 0, through a
    sigmoid for logits, stretched to 0..1 by its minimum and maximum, resized back."""
    prediction = np.asarray(output, dtype=np.float64)[:, 0, :, :]
    if family.sigmoid:
        prediction = 1.0 / (1.0 + np.exp(-prediction))
    low, high = float(prediction.min()), float(prediction.max())
    # a flat prediction has no foreground to tell (rembg would divide by zero here)
    prediction = (prediction - low) / (high - low) if high > low else np.zeros_like(prediction)
    mask = Image.fromarray((np.squeeze(prediction) * 255).astype(np.uint8), mode="L")
    return mask.resize(size, Image.Resampling.LANCZOS)


def naive_cutout(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The image over transparency through the mask: RGBA, colour and alpha scaled by it."""
    return Image.composite(image, Image.new("RGBA", image.size, 0), mask)


# --- models ---------------------------------------------------------------------------------


def available_models(job_models: Mapping[str, Path], models_dir: Path | None) -> dict[str, Path]:
    """Model name (the file's stem) -> file: the job's rembg checkpoints, then the folder's."""
    found: dict[str, Path] = {}
    for file_name, path in job_models.items():
        found.setdefault(Path(file_name).stem, Path(path))
    if models_dir is not None and models_dir.is_dir():
        for path in sorted(models_dir.glob("*.onnx")):
            found.setdefault(path.stem, path)
    return found


def find_model(model: str, job_models: Mapping[str, Path], models_dir: Path | None) -> Path:
    available = available_models(job_models, models_dir)
    for name, path in available.items():
        if name.lower() == model.strip().lower():
            return path
    raise UnknownRembgModel(
        f"rembg model {model!r} is not available; available: {', '.join(available) or 'none'} "
        '(add one as a rembg checkpoint in "models", or to ESD_REMBG_MODELS_DIR)'
    )


class BackgroundRemover:
    """Runs rembg requests; ONNX sessions stay open (the last `max_sessions` used)."""

    def __init__(
        self, *, models_dir: Path | None = None, device: str = "cpu", threads: int = 0, max_sessions: int = 2
    ) -> None:
        self.models_dir = Path(models_dir) if models_dir else None
        self.device = str(device)
        self.threads = threads
        self.max_sessions = max(1, max_sessions)
        self.loads = 0
        self._sessions: OrderedDict[tuple[Path, int, int], Any] = OrderedDict()
        self._lock = threading.Lock()

    def run(self, request: RembgRequest, job_models: Mapping[str, Path]) -> ImagesResult:
        started = time.perf_counter()
        family = family_of(request.model)
        path = find_model(request.model, job_models, self.models_dir)
        image = ImageOps.exif_transpose(decode_image(request.input_image))
        mask = self.mask(image, path, family)
        if request.return_mask:
            result = mask
        elif request.alpha_matting:
            result = alpha_matting_cutout(
                image,
                mask,
                foreground_threshold=request.alpha_matting_foreground_threshold,
                background_threshold=request.alpha_matting_background_threshold,
                erode_size=request.alpha_matting_erode_size,
            )
        else:
            result = naive_cutout(image, mask)
        parameters = request.model_dump(mode="json", exclude={"input_image"})
        info = {
            "model": request.model,
            "model_family": family.name,
            "mode": result.mode,
            "size": [result.width, result.height],
            "elapsed_seconds": round(time.perf_counter() - started, 3),
        }
        return ImagesResult(images=[NamedImage(name="image_0.png", png=png(result))], parameters=parameters, info=info)

    def mask(self, image: Image.Image, path: Path, family: Family) -> Image.Image:
        session = self._session(path)
        inputs = session.get_inputs()
        outputs = session.run(None, {inputs[0].name: model_input(image, family)})
        return mask_from_output(outputs[0], image.size, family)

    def _session(self, path: Path):
        import onnxruntime  # only the workers that remove backgrounds need it

        stat = path.stat()
        key = (path.resolve(), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._sessions:
                self._sessions.move_to_end(key)
                return self._sessions[key]
            while len(self._sessions) >= self.max_sessions:
                self._sessions.popitem(last=False)
            options = onnxruntime.SessionOptions()
            if self.threads > 0:
                options.intra_op_num_threads = self.threads
            available = onnxruntime.get_available_providers()
            providers = ["CPUExecutionProvider"]
            if self.device.startswith("cuda") and "CUDAExecutionProvider" in available:
                providers.insert(0, "CUDAExecutionProvider")
            try:
                session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers)
            except Exception as error:  # onnxruntime's own exception types
                raise Invalid(f"{path.name} is not an ONNX model onnxruntime can run: {error}") from None
            self.loads += 1
            self._sessions[key] = session
            return session
