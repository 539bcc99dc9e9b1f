"""The extras: AUTOMATIC1111's `/sdapi/v1/extra-single-image` and `/sdapi/v1/extra-batch-images`
(ESD's task types `extra-single-image` and `extra-batch-images`): upscale each image by a
factor or to a size (optionally cropped to it), with a second upscaler blended in, as the
AUTOMATIC1111 postprocessing does.

    request = ExtrasRequest.from_payload("extra-single-image", payload)
    result = Extras(upscalers).run(request, ExtrasModels(upscalers={"4x-tiny.pth": path}))

Sizes follow AUTOMATIC1111: a factor (`resize_mode` 0) or the factor that covers
`upscaling_resize_w` x `upscaling_resize_h` (`resize_mode` 1) gives the target, rounded down to
a multiple of 8; with `upscaling_crop` the result is centred on a canvas of exactly the asked
size. Face restoration (`gfpgan_visibility`, `codeformer_visibility`) needs a face detector
this platform does not have yet: such a job fails, naming what is missing.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from diffusion.images import PIXELS_SETTING
from services.inference.worker.engine.outputs import ImagesResult, NamedImage, output_names, png
from services.inference.worker.engine.request import InvalidPayload, decode_image
from services.inference.worker.engine.upscalers import Size, Upscalers
from shared.errors import Invalid

EXTRAS_TASKS = ("extra-single-image", "extra-batch-images")
MAX_SIDE = 16384  # pixels of an output's side; beyond that an image is a mistake, not a wish
# an upscale's output may hold this many times the pixels an input may (ESD_MAX_IMAGE_PIXELS):
# 100 MP by default, a 2048x2048 image upscaled 4x fits; a bomb of a request does not
OUTPUT_PIXELS_FACTOR = 4


class FaceRestorationUnavailable(Invalid):
    """Face restoration was asked for and cannot be done; the message says what is missing."""


class ImageData(BaseModel):
    """One entry of `imageList` (AUTOMATIC1111's FileData)."""

    data: str
    name: str | None = None


class ExtrasRequest(BaseModel):
    """AUTOMATIC1111's ExtrasBaseRequest plus the images of the single or the batch form.
    Unknown keys are ignored."""

    model_config = ConfigDict(extra="ignore")

    task: Literal["extra-single-image", "extra-batch-images"] = "extra-single-image"
    resize_mode: Literal[0, 1] = 0
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    codeformer_visibility: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    codeformer_weight: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    upscaling_resize: float = Field(2.0, ge=1.0, le=8.0, allow_inf_nan=False)
    upscaling_resize_w: int = Field(512, ge=1, le=MAX_SIDE)
    upscaling_resize_h: int = Field(512, ge=1, le=MAX_SIDE)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    upscale_first: bool = False
    image: str | None = None  # extra-single-image
    imageList: list[ImageData] = Field(default_factory=list)  # extra-batch-images (A1111 spells it so)

    @model_validator(mode="before")
    @classmethod
    def _nulls_mean_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {key: value for key, value in data.items() if value is not None}
        return data

    @field_validator("image")
    @classmethod
    def _image_decodes(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                decode_image(value)
            except InvalidPayload as error:
                raise ValueError(error.message) from None
        return value

    @field_validator("imageList")
    @classmethod
    def _images_decode(cls, value: list[ImageData]) -> list[ImageData]:
        for index, entry in enumerate(value):
            try:
                decode_image(entry.data)
            except InvalidPayload as error:
                raise ValueError(f"image {index}: {error.message}") from None
        return value

    @model_validator(mode="after")
    def _has_images(self) -> ExtrasRequest:
        if self.task == "extra-single-image" and not self.image:
            raise ValueError("image: extra-single-image needs an image (base64)")
        if self.task == "extra-batch-images" and not self.imageList:
            raise ValueError("imageList: extra-batch-images needs at least one image")
        return self

    @classmethod
    def from_payload(cls, task: str, payload: Any) -> ExtrasRequest:
        if task not in EXTRAS_TASKS:
            raise InvalidPayload(f"task type {task} should be in {list(EXTRAS_TASKS)}")
        if not isinstance(payload, dict):
            raise InvalidPayload(f"the {task} payload must be a JSON object, not {type(payload).__name__}")
        try:
            return cls.model_validate({**payload, "task": task})
        except ValidationError as error:
            parts = []
            for item in error.errors():
                location = ".".join(str(part) for part in item["loc"])
                message = item["msg"].removeprefix("Value error, ")
                parts.append(f"{location}: {message}" if location else message)
            raise InvalidPayload(f"invalid {task} payload: {'; '.join(parts)}") from None

    def inputs(self) -> list[tuple[Image.Image, str | None]]:
        """The images to process, each with its name when the request gave one."""
        if self.task == "extra-single-image":
            assert self.image is not None
            return [(decode_image(self.image), None)]
        return [(decode_image(entry.data), entry.name) for entry in self.imageList]

    @property
    def upscales(self) -> bool:
        # AUTOMATIC1111: without a first upscaler there is no upscale step at all
        return not _none(self.upscaler_1)

    @property
    def has_second_upscaler(self) -> bool:
        return self.upscales and not _none(self.upscaler_2)

    @property
    def blends_second_upscaler(self) -> bool:
        return self.has_second_upscaler and self.extras_upscaler_2_visibility > 0


def _none(upscaler: str) -> bool:
    return upscaler.strip().lower() in ("", "none")


@dataclass(frozen=True)
class UpscalePlan:
    """What the upscale step makes of one image: the upscalers' target and, when cropping, the
    canvas the result is centred on."""

    factor: float
    target: Size
    crop: Size | None


def plan_upscale(size: Size, request: ExtrasRequest) -> UpscalePlan:
    """AUTOMATIC1111's sizes: the factor (asked, or the one covering the asked size), the
    target rounded down to a multiple of 8, and the crop of `resize_mode` 1."""
    width, height = size
    if request.resize_mode == 1:
        factor = max(request.upscaling_resize_w / width, request.upscaling_resize_h / height)
        crop = (request.upscaling_resize_w, request.upscaling_resize_h) if request.upscaling_crop else None
    else:
        factor, crop = request.upscaling_resize, None
    target = (int(width * factor // 8 * 8), int(height * factor // 8 * 8))
    if min(target) < 8:
        raise InvalidPayload(f"the image ({width}x{height}) upscaled by {factor:g} is under 8 pixels a side")
    if max(target) > MAX_SIDE:
        raise InvalidPayload(
            f"the image ({width}x{height}) upscaled by {factor:g} would be {target[0]}x{target[1]}, "
            f"over {MAX_SIDE} pixels a side"
        )
    most = OUTPUT_PIXELS_FACTOR * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
    if most is not None and target[0] * target[1] > most:
        raise InvalidPayload(
            f"the image ({width}x{height}) upscaled by {factor:g} would be {target[0]}x{target[1]}, "
            f"over {most} pixels ({OUTPUT_PIXELS_FACTOR} x {PIXELS_SETTING})"
        )
    return UpscalePlan(factor=factor, target=target, crop=crop)


def centre_crop(image: Image.Image, size: Size) -> Image.Image:
    """The image centred on a black canvas of `size` (what sticks out is cut off), as
    AUTOMATIC1111 crops."""
    canvas = Image.new("RGB", size)
    canvas.paste(image, box=(size[0] // 2 - image.width // 2, size[1] // 2 - image.height // 2))
    return canvas


@dataclass(frozen=True)
class ExtrasModels:
    """Local files of the job's models that the extras use, by file name."""

    upscalers: Mapping[str, Path] = field(default_factory=dict)
    face_restorers: Mapping[str, Mapping[str, Path]] = field(default_factory=dict)  # type -> files


def check_face_restoration(request: ExtrasRequest, models: ExtrasModels) -> None:
    for field_name, visibility, model_type in (
        ("gfpgan_visibility", request.gfpgan_visibility, "GFPGAN"),
        ("codeformer_visibility", request.codeformer_visibility, "Codeformer"),
    ):
        if visibility <= 0:
            continue
        if not models.face_restorers.get(model_type):
            raise FaceRestorationUnavailable(
                f"{field_name} {visibility:g} asks for {model_type} face restoration, but the job names no "
                f'{model_type} model: add one to "models" ({{"{model_type}": ["<file>.pth"]}})'
            )
        raise FaceRestorationUnavailable(
            f"{field_name}: {model_type} face restoration also needs a face detector and aligner (AUTOMATIC1111 "
            "uses facexlib's RetinaFace), which this platform does not have yet; set it to 0"
        )


class Extras:
    def __init__(self, upscalers: Upscalers) -> None:
        self.upscalers = upscalers

    def run(self, request: ExtrasRequest, models: ExtrasModels) -> ImagesResult:
        started = time.perf_counter()
        check_face_restoration(request, models)
        # find both upscalers before any work, so that a wrong name fails at once
        first = self.upscalers.find(request.upscaler_1, models.upscalers) if request.upscales else None
        second = self.upscalers.find(request.upscaler_2, models.upscalers) if request.has_second_upscaler else None
        if not request.blends_second_upscaler:
            second = None  # named, so checked, but invisible
        inputs = request.inputs()
        names = output_names([name for _, name in inputs])
        images: list[NamedImage] = []
        infotexts: list[str] = []
        sizes: list[list[int]] = []
        for (source, _), name in zip(inputs, names, strict=True):
            original = source.info.get("parameters")
            image = ImageOps.exif_transpose(source).convert("RGB")
            fields: dict[str, Any] = {}
            if first is not None:
                plan = plan_upscale(image.size, request)
                result = self._upscale(image, plan, first)
                if second is not None:
                    result = Image.blend(
                        result, self._upscale(image, plan, second), request.extras_upscaler_2_visibility
                    )
                fields.update(_upscale_fields(request, plan))
                image = result
            text = ", ".join(f"{key}: {value}" for key, value in fields.items())
            texts = {"postprocessing": text} if text else {}
            if isinstance(original, str):
                texts["parameters"] = original  # the generation parameters the input carried
            images.append(NamedImage(name=name, png=png(image, texts)))
            infotexts.append(text)
            sizes.append([image.width, image.height])
        parameters = request.model_dump(mode="json", exclude={"task", "image", "imageList"})
        info = {
            "html_info": "<br>".join(text for text in infotexts if text) or "",
            "infotexts": infotexts,
            "sizes": sizes,
            "elapsed_seconds": round(time.perf_counter() - started, 3),
        }
        return ImagesResult(images=images, parameters=parameters, info=info)

    @staticmethod
    def _upscale(image: Image.Image, plan: UpscalePlan, upscale) -> Image.Image:
        result = upscale(image, plan.target)
        if plan.crop is not None:
            result = centre_crop(result, plan.crop)
        return result.convert("RGB")


def _upscale_fields(request: ExtrasRequest, plan: UpscalePlan) -> dict[str, Any]:
    """AUTOMATIC1111's `postprocessing` infotext of the upscale step."""
    fields: dict[str, Any] = {}
    if request.resize_mode == 1:
        fields["Postprocess upscale to"] = f"{request.upscaling_resize_w}x{request.upscaling_resize_h}"
    else:
        fields["Postprocess upscale by"] = f"{plan.factor:g}"
    fields["Postprocess upscaler"] = request.upscaler_1
    if request.blends_second_upscaler:
        fields["Postprocess upscaler 2"] = request.upscaler_2
        fields["Postprocess upscaler 2 visibility"] = f"{request.extras_upscaler_2_visibility:g}"
    if plan.crop is not None:
        fields["Postprocess crop to"] = f"{plan.crop[0]}x{plan.crop[1]}"
    return fields
