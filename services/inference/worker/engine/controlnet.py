"""ControlNet units as the AUTOMATIC1111 ControlNet extension takes them in
`alwayson_scripts.controlnet.args`, and what the engine does with them.

Each enabled unit names a preprocessor (`module`), a ControlNet model (`model`, as A1111 lists
it: `control_v11p_sd15_canny [d14c016b]`), an image (base64; an img2img job's own image when
left out), a weight, the part of the sampling it acts in (`guidance_start`/`guidance_end`),
how the image is fitted to the generation size (`resize_mode`) and how it balances against
the prompt (`control_mode`). Preprocessors that need no model of their own are run here
(`none`, `canny`, `invert`, `binary`, `threshold`); a detected map is fitted to each pass's size
as the extension does. Several units run at once, their residuals summed.

The control modes follow the extension: "Balanced" scales every residual by the weight; "My
prompt is more important" scales the 13 residuals by `weight * 0.825 ** (12 - i)`, the deeper
the stronger; "ControlNet is more important" does the same and steers the conditional half of
the classifier-free-guidance batch only. The hires-fix pass always uses the graded weights.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Any

import cv2
import numpy as np
import torch
from diffusers import MultiControlNetModel
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.inference.worker.engine.request import InvalidPayload, decode_image

SCRIPT_KEYS = ("controlnet", "ControlNet")
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]+\]\s*$")


class ResizeMode(Enum):
    JUST_RESIZE = "Just Resize"
    CROP_AND_RESIZE = "Crop and Resize"
    RESIZE_AND_FILL = "Resize and Fill"


class ControlMode(Enum):
    BALANCED = "Balanced"
    PROMPT = "My prompt is more important"
    CONTROL = "ControlNet is more important"


# Older names the extension still accepts.
_RESIZE_ALIASES = {
    "inner fit (scale to fit)": ResizeMode.CROP_AND_RESIZE,
    "scale to fit (inner fit)": ResizeMode.CROP_AND_RESIZE,
    "outer fit (shrink to fit)": ResizeMode.RESIZE_AND_FILL,
    "envelope (outer fit)": ResizeMode.RESIZE_AND_FILL,
}

# Preprocessor -> its defaults for (processor_res, threshold_a, threshold_b), used where the
# unit sends a negative value (the extension's "use the default").
PREPROCESSORS: dict[str, tuple[int | None, float | None, float | None]] = {
    "none": (None, None, None),
    "canny": (512, 100, 200),
    "invert": (None, None, None),
    "binary": (512, 0, None),
    "threshold": (512, 127, None),
}
_PREPROCESSOR_ALIASES = {
    "invert (from white bg & black line)": "invert",
    "threshold (binarization)": "threshold",
}


class ControlNetUnit(BaseModel):
    """One unit of the extension's API (`external_code.ControlNetUnit`); unknown keys ignored."""

    model_config = ConfigDict(extra="ignore")

    enabled: bool = True
    module: str = "none"
    model: str = "None"
    weight: float = Field(1.0, ge=0.0, le=10.0, allow_inf_nan=False)
    image: str | None = None
    resize_mode: ResizeMode = ResizeMode.CROP_AND_RESIZE
    processor_res: int = -1
    threshold_a: float = Field(-1, allow_inf_nan=False)
    threshold_b: float = Field(-1, allow_inf_nan=False)
    guidance_start: float = Field(0.0, ge=0.0, le=1.0)
    guidance_end: float = Field(1.0, ge=0.0, le=1.0)
    pixel_perfect: bool = False
    control_mode: ControlMode = ControlMode.BALANCED

    @model_validator(mode="before")
    @classmethod
    def _extension_names(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = {key: value for key, value in data.items() if value is not None}
        # the extension's older key names
        for old, new in (("input_image", "image"), ("guidance", "guidance_end")):
            if old in data and new not in data:
                data[new] = data.pop(old)
        image = data.get("image")
        if isinstance(image, dict):  # {"image": ..., "mask": ...}: the mask is for inpainting models
            data["image"] = image.get("image")
        if data.get("image") == "":
            data.pop("image")
        return data

    @field_validator("module")
    @classmethod
    def _known_preprocessor(cls, value: str) -> str:
        name = _PREPROCESSOR_ALIASES.get(value.strip().lower(), value.strip().lower())
        if name not in PREPROCESSORS:
            raise ValueError(f"unknown preprocessor {value!r}; this platform runs {', '.join(PREPROCESSORS)}")
        return name

    @field_validator("resize_mode", mode="before")
    @classmethod
    def _resize_mode(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"not a resize mode: {value!r}")
        if isinstance(value, int):
            if value == 3:  # "Just Resize (Latent upscale)"
                return ResizeMode.JUST_RESIZE
            modes = list(ResizeMode)
            if not 0 <= value < len(modes):
                raise ValueError(f"resize mode {value} is not 0, 1 or 2")
            return modes[value]
        if isinstance(value, str):
            alias = _RESIZE_ALIASES.get(value.strip().lower())
            if alias is not None:
                return alias
            for mode in ResizeMode:
                if mode.value.lower() == value.strip().lower():
                    return mode
            raise ValueError(f"unknown resize mode {value!r}; known: {', '.join(mode.value for mode in ResizeMode)}")
        return value

    @field_validator("control_mode", mode="before")
    @classmethod
    def _control_mode(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"not a control mode: {value!r}")
        if isinstance(value, int):
            modes = list(ControlMode)
            if not 0 <= value < len(modes):
                raise ValueError(f"control mode {value} is not 0, 1 or 2")
            return modes[value]
        if isinstance(value, str):
            for mode in ControlMode:
                if mode.value.lower() == value.strip().lower():
                    return mode
            raise ValueError(f"unknown control mode {value!r}; known: {', '.join(mode.value for mode in ControlMode)}")
        return value

    @field_validator("image")
    @classmethod
    def _image_decodes(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                decode_image(value)
            except InvalidPayload as error:
                raise ValueError(error.message) from None
        return value

    @model_validator(mode="after")
    def _guidance_range(self) -> ControlNetUnit:
        if self.enabled and self.guidance_start >= self.guidance_end:
            raise ValueError(f"guidance_start ({self.guidance_start}) must be below guidance_end ({self.guidance_end})")
        if self.enabled and model_name(self.model) is None:
            raise ValueError("an enabled unit must name a ControlNet model")
        return self

    @property
    def model_name(self) -> str:
        name = model_name(self.model)
        assert name is not None
        return name

    def settings(self) -> tuple[int, float, float]:
        """processor_res, threshold_a and threshold_b, the preprocessor's defaults in place of
        negative values."""
        defaults = PREPROCESSORS[self.module]
        values = (self.processor_res, self.threshold_a, self.threshold_b)
        chosen = [
            default if value < 0 and default is not None else value
            for value, default in zip(values, defaults, strict=True)
        ]
        return int(chosen[0]), float(chosen[1]), float(chosen[2])

    def infotext(self, model_label: str) -> str:
        """The extension's `ControlNet N` infotext entry."""
        resolution, threshold_a, threshold_b = self.settings()
        parts = [
            f"Module: {self.module}",
            f"Model: {model_label}",
            f"Weight: {self.weight:g}",
            f"Resize Mode: {self.resize_mode.value}",
            f"Processor Res: {resolution}",
            f"Threshold A: {threshold_a:g}",
            f"Threshold B: {threshold_b:g}",
            f"Guidance Start: {self.guidance_start:g}",
            f"Guidance End: {self.guidance_end:g}",
            f"Pixel Perfect: {self.pixel_perfect}",
            f"Control Mode: {self.control_mode.value}",
        ]
        return ", ".join(parts)


def model_name(value: str) -> str | None:
    """The file stem A1111 lists a ControlNet model under, without its ` [hash]`; None for
    "None" or nothing."""
    name = _HASH_SUFFIX.sub("", value or "").strip()
    return None if name in ("", "None") else name


def parse_units(alwayson_scripts: dict[str, Any]) -> list[ControlNetUnit]:
    """The enabled units of `alwayson_scripts.controlnet.args` (or `ControlNet`), validated;
    a bad unit raises an InvalidPayload naming it."""
    for key in SCRIPT_KEYS:
        if key in alwayson_scripts:
            script = alwayson_scripts[key]
            break
    else:
        return []
    where = f"alwayson_scripts.{key}"
    if script is None:
        return []
    if not isinstance(script, dict) or not isinstance(script.get("args", []), list):
        raise InvalidPayload(f"{where}: must be an object with an `args` list of ControlNet units")
    units = []
    for index, raw in enumerate(script.get("args", [])):
        if raw is None:
            continue
        if not isinstance(raw, dict):
            raise InvalidPayload(f"{where}.args[{index}]: a ControlNet unit must be an object")
        if raw.get("enabled", True) is False:
            continue  # clients send their disabled units too, with whatever settings they hold
        try:
            unit = ControlNetUnit.model_validate(raw)
        except ValidationError as error:
            details = "; ".join(
                f"{'.'.join(str(part) for part in item['loc'])}: {item['msg'].removeprefix('Value error, ')}".lstrip(
                    ": "
                )
                for item in error.errors()
            )
            raise InvalidPayload(f"{where}.args[{index}]: {details}") from None
        units.append(unit)
    return units


# Preprocessing: numpy RGB images (height, width, 3), uint8.


def detect(unit: ControlNetUnit, image: Image.Image, width: int, height: int) -> np.ndarray:
    """The unit's detected map of `image` (for a generation of width x height: "pixel perfect"
    takes the processor resolution from it)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    resolution, threshold_a, threshold_b = unit.settings()
    if unit.pixel_perfect:
        resolution = _pixel_perfect_resolution(pixels, width, height, unit.resize_mode)
    if unit.module == "none":
        return pixels
    if unit.module == "invert":
        return 255 - pixels
    padded, unpad = _resize_with_padding(pixels, resolution)
    if unit.module == "canny":
        edges = cv2.Canny(padded, threshold_a, threshold_b)
        return unpad(_rgb(edges))
    gray = cv2.cvtColor(padded, cv2.COLOR_RGB2GRAY)
    if unit.module == "binary":
        if threshold_a in (0, 255):  # Otsu's threshold
            _, binary = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
        else:
            _, binary = cv2.threshold(gray, threshold_a, 255, cv2.THRESH_BINARY_INV)
        return unpad(_rgb(binary))
    # threshold
    result = np.zeros_like(padded)
    result[np.min(padded, axis=2) > threshold_a] = 255
    return unpad(result)


def fit(detected: np.ndarray, mode: ResizeMode, width: int, height: int) -> Image.Image:
    """A detected map fitted to width x height: stretched ("Just Resize"), scaled to cover and
    centre-cropped ("Crop and Resize") or scaled to fit and centred on its border colour
    ("Resize and Fill")."""
    if mode == ResizeMode.JUST_RESIZE:
        return Image.fromarray(_resize(detected, width, height))
    old_height, old_width = detected.shape[:2]
    scale_h, scale_w = height / old_height, width / old_width
    if mode == ResizeMode.RESIZE_AND_FILL:
        scale = min(scale_h, scale_w)
        borders = np.concatenate([detected[0], detected[-1], detected[:, 0], detected[:, -1]], axis=0)
        background = np.tile(np.median(borders, axis=0).astype(np.uint8)[None, None], (height, width, 1))
        resized = _resize(detected, round(old_width * scale), round(old_height * scale))
        new_height, new_width = resized.shape[:2]
        top, left = max(0, (height - new_height) // 2), max(0, (width - new_width) // 2)
        background[top : top + new_height, left : left + new_width] = resized[:height, :width]
        return Image.fromarray(background)
    scale = max(scale_h, scale_w)
    resized = _resize(detected, round(old_width * scale), round(old_height * scale))
    new_height, new_width = resized.shape[:2]
    top, left = max(0, (new_height - height) // 2), max(0, (new_width - width) // 2)
    return Image.fromarray(np.ascontiguousarray(resized[top : top + height, left : left + width]))


def _resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area averaging down, bicubic up; a black-and-white map (edges) stays black and white.
    (The extension's resize also thins one-pixel edges; this one does not.)"""
    if pixels.shape[1] == width and pixels.shape[0] == height:
        return pixels
    smaller = width * height < pixels.shape[0] * pixels.shape[1]
    resized = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA if smaller else cv2.INTER_CUBIC)
    colours = np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)
    if len(colours) <= 2 and pixels.min() < 16 and pixels.max() > 240:
        resized = np.where(resized > 127, 255, 0).astype(np.uint8)
    return resized


def _resize_with_padding(pixels: np.ndarray, resolution: int):
    """The image scaled so that its shorter side is `resolution`, edge-padded to multiples of
    64 for the detector, and the function that removes the padding again."""
    height, width = pixels.shape[:2]
    scale = resolution / min(height, width)
    new_height, new_width = round(height * scale), round(width * scale)
    resized = cv2.resize(
        pixels, (new_width, new_height), interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA
    )
    padded = np.pad(resized, [[0, -new_height % 64], [0, -new_width % 64], [0, 0]], mode="edge")

    def unpad(result: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(result[:new_height, :new_width])

    return np.ascontiguousarray(padded), unpad


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _pixel_perfect_resolution(pixels: np.ndarray, width: int, height: int, mode: ResizeMode) -> int:
    raw_height, raw_width = pixels.shape[:2]
    scale_h, scale_w = height / raw_height, width / raw_width
    scale = min(scale_h, scale_w) if mode == ResizeMode.RESIZE_AND_FILL else max(scale_h, scale_w)
    return round(scale * min(raw_height, raw_width))


def control_scales(mode: ControlMode, count: int, hires: bool) -> list[float]:
    """The factor of each of a ControlNet's `count` residuals (the deepest last) before the
    unit's weight: 1 in the balanced mode, `0.825 ** (12 - i)` otherwise and in the hires-fix
    pass. As in the extension, the 13 graded factors are cut to the residuals there are
    (SDXL's 10 take the first 10)."""
    if mode == ControlMode.BALANCED and not hires:
        return [1.0] * count
    return [0.825 ** float(12 - index) for index in range(13)][:count]


class ControlUnits(MultiControlNetModel):
    """diffusers' Multi-ControlNet with the extension's per-unit control modes: each unit's
    residuals scaled by its weight and mode, and a "ControlNet is more important" unit's
    residuals kept off the unconditional half of the batch."""

    def __init__(self, controlnets: list, modes: list[ControlMode], *, hires: bool = False):
        super().__init__(controlnets)
        self.modes = modes
        self.hires = hires
        self.guided = True  # the batch holds [unconditional, conditional] halves (CFG on)

    def forward(
        self,
        sample: torch.Tensor,
        timestep,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: list[torch.Tensor],
        conditioning_scale: list[float],
        class_labels=None,
        timestep_cond=None,
        attention_mask=None,
        added_cond_kwargs=None,
        cross_attention_kwargs=None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ):
        down_total: list[torch.Tensor] | None = None
        mid_total: torch.Tensor | None = None
        for image, scale, controlnet, mode in zip(
            controlnet_cond, conditioning_scale, self.nets, self.modes, strict=True
        ):
            if scale == 0 and down_total is not None:
                continue  # outside its guidance range, or weight 0: adds nothing
            down, mid = controlnet(
                sample=sample,
                timestep=timestep,
                encoder_hidden_states=encoder_hidden_states,
                controlnet_cond=image,
                conditioning_scale=1.0,
                class_labels=class_labels,
                timestep_cond=timestep_cond,
                attention_mask=attention_mask,
                added_cond_kwargs=added_cond_kwargs,
                cross_attention_kwargs=cross_attention_kwargs,
                guess_mode=False,
                return_dict=False,
            )
            factors = [scale * factor for factor in control_scales(mode, len(down) + 1, self.hires)]
            down = [residual * factor for residual, factor in zip(down, factors, strict=False)]
            mid = mid * factors[-1]
            if mode == ControlMode.CONTROL and self.guided:
                down = [_conditional_only(residual) for residual in down]
                mid = _conditional_only(mid)
            if down_total is None:
                down_total, mid_total = down, mid
            else:
                down_total = [total + residual for total, residual in zip(down_total, down, strict=True)]
                mid_total = mid_total + mid
        return down_total, mid_total


def _conditional_only(residual: torch.Tensor) -> torch.Tensor:
    half = residual.shape[0] // 2
    return torch.cat([torch.zeros_like(residual[:half]), residual[half:]])


def unit_image(unit: ControlNetUnit, fallback: Image.Image | None, index: int) -> Image.Image:
    """The unit's own image, or the img2img job's image when it has none."""
    if unit.image is not None:
        return decode_image(unit.image).convert("RGB")
    if fallback is not None:
        return fallback
    raise InvalidPayload(f"alwayson_scripts.controlnet.args[{index}]: the unit has no image (image)")


def sanitized(alwayson_scripts: dict[str, Any]) -> dict[str, Any]:
    """`alwayson_scripts` without the images, for the job's recorded parameters."""
    cleaned: dict[str, Any] = {}
    for key, script in alwayson_scripts.items():
        if key in SCRIPT_KEYS and isinstance(script, dict) and isinstance(script.get("args"), list):
            args = [
                {name: value for name, value in unit.items() if name not in ("image", "input_image", "mask")}
                if isinstance(unit, dict)
                else unit
                for unit in script["args"]
            ]
            cleaned[key] = {**script, "args": args}
        else:
            cleaned[key] = script
    return cleaned
