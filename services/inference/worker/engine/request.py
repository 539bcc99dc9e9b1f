"""The generation request: an AUTOMATIC1111 `/sdapi/v1/txt2img` or `img2img` body, validated.

Unknown keys are ignored (clients send A1111's whole parameter set and the non-standard
`Infinity` for `s_tmax`); a bad value raises an InvalidPayload whose message names the field,
which the worker records as the job's failure reason. Besides the basics it carries the hires
fix (`enable_hr`, `hr_*`), ControlNet units (`alwayson_scripts.controlnet.args`) and the
`override_settings` the engine honours (`sd_model_checkpoint`, `sd_vae`,
`CLIP_stop_at_last_layers`, `eta_noise_seed_delta`).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from diffusion.images import ImageTooLarge, open_image
from services.inference.worker.engine.samplers import SamplerChoice, UnknownSampler, resolve_sampler
from shared.errors import Invalid
from shared.untrusted import excerpt

Task = Literal["txt2img", "img2img"]
TASKS: tuple[str, ...] = ("txt2img", "img2img")
MAX_SEED = 2**32 - 1

# <lora:name>, <lora:name:0.8>, <lora:name:0.8:0.5> (A1111's text-encoder/UNet pair; the first
# weight is used for both); LyCORIS's <lyco:...> reads the same.
_LORA_TAG = re.compile(r"<(?:lora|lyco):([^:>]+)(?::([^:>]*))?(?::[^>]*)?>", re.IGNORECASE)
_DATA_URL = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,")
# A1111 names a checkpoint or VAE with its short hash: "v1-5-pruned.safetensors [6ce0161689]"
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]+\]\s*$")


class InvalidPayload(Invalid):
    """The A1111 body, or the prompt's tags, ask for something invalid; the message names the
    field (`invalid txt2img payload: steps: ...`, `prompt: LoRA 'ink' ...`)."""


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    task: Task = "txt2img"
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = Field(20, ge=1, le=150)
    sampler_name: str = "Euler a"
    scheduler: str | None = None  # A1111 1.9+: "Automatic", "Karras", ...
    cfg_scale: float = Field(7.0, ge=0.0, le=30.0, allow_inf_nan=False)
    width: int = Field(512, ge=64, le=2048)
    height: int = Field(512, ge=64, le=2048)
    seed: int = Field(-1, ge=-1, le=MAX_SEED)
    subseed: int = -1  # variation seeds are not supported; accepted and ignored
    batch_size: int = Field(1, ge=1, le=64)
    n_iter: int = Field(1, ge=1, le=100)
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0, allow_inf_nan=False)
    init_images: list[str] = Field(default_factory=list)
    override_settings: dict[str, Any] = Field(default_factory=dict)
    # The hires fix (txt2img); see `hires.py`.
    enable_hr: bool = False
    hr_scale: float = Field(2.0, gt=0.0, le=8.0, allow_inf_nan=False)
    hr_upscaler: str | None = None  # None: "Latent", but not written into the infotext
    hr_second_pass_steps: int = Field(0, ge=0, le=150)
    hr_resize_x: int = Field(0, ge=0, le=4096)
    hr_resize_y: int = Field(0, ge=0, le=4096)
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _nulls_mean_defaults(cls, data: Any) -> Any:
        # A1111 clients send `null` for fields they leave at the default.
        if isinstance(data, dict):
            data = {key: value for key, value in data.items() if value is not None}
            if "sampler_name" not in data and isinstance(data.get("sampler_index"), str):
                data["sampler_name"] = data["sampler_index"]  # the pre-1.0 field name
        return data

    # Validators raise ValueError, as pydantic wants; `from_payload` makes one InvalidPayload of
    # them all.

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8 (got {value})")
        return value

    @field_validator("sampler_name", "hr_sampler_name")
    @classmethod
    def _known_sampler(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            resolve_sampler(value)
        except UnknownSampler as error:
            raise ValueError(error.message) from None  # pydantic names the field
        return value

    @field_validator("scheduler", "hr_scheduler")
    @classmethod
    def _known_schedule(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                resolve_sampler("Euler", value)
            except UnknownSampler as error:
                raise ValueError(error.message) from None
        return value

    @field_validator("init_images")
    @classmethod
    def _images_decode(cls, value: list[str]) -> list[str]:
        for index, text in enumerate(value):
            try:
                decode_image(text)
            except InvalidPayload as error:
                raise ValueError(f"image {index}: {error.message}") from None
        return value

    @model_validator(mode="after")
    def _task_inputs(self) -> GenerationRequest:
        if self.task == "img2img":
            if not self.init_images:
                raise ValueError("init_images: img2img needs at least one image")
            if int(self.steps * self.denoising_strength) < 1:
                raise ValueError(
                    f"denoising_strength: {self.denoising_strength} x {self.steps} steps leaves no step to run"
                )
        elif self.enable_hr:
            steps = self.hr_second_pass_steps or self.steps
            if int(steps * self.denoising_strength) < 1:
                raise ValueError(
                    f"denoising_strength: {self.denoising_strength} x {steps} hires steps leaves no step to run"
                )
        return self

    @classmethod
    def from_payload(
        cls, task: str, payload: dict[str, Any], *, max_prompt_chars: int | None = None
    ) -> GenerationRequest:
        """Validate an A1111 body for `task` (txt2img or img2img); a prompt longer than
        `max_prompt_chars` is refused before anything reads it."""
        if task not in TASKS:
            raise InvalidPayload(f"task type {task} should be in {list(TASKS)}")
        if not isinstance(payload, dict):
            raise InvalidPayload(f"the {task} payload must be a JSON object, not {type(payload).__name__}")
        if max_prompt_chars is not None:
            check_prompt_lengths(payload, max_prompt_chars)
        try:
            request = cls.model_validate({**payload, "task": task})
        except ValidationError as error:
            raise InvalidPayload(f"invalid {task} payload: {_describe(error)}") from None
        request.controlnet_units()  # a bad unit fails here, before any model is loaded
        request.eta_noise_seed_delta  # noqa: B018 (likewise a bad setting)
        return request

    # What the engine derives from the request.

    @property
    def sampler(self) -> SamplerChoice:
        return resolve_sampler(self.sampler_name, self.scheduler)

    @property
    def images_count(self) -> int:
        return self.batch_size * self.n_iter

    @property
    def clip_skip(self) -> int:
        """A1111's "Clip skip" (1 = the last layer), from `override_settings`."""
        value = self.override_settings.get("CLIP_stop_at_last_layers", 1)
        try:
            return max(1, int(value))
        except (TypeError, ValueError):
            raise InvalidPayload(f"override_settings.CLIP_stop_at_last_layers: not a number ({value!r})") from None

    @property
    def vae_setting(self) -> str | None:
        """`override_settings.sd_vae`, or None when it asks for the checkpoint's own VAE."""
        value = self.override_settings.get("sd_vae")
        if not isinstance(value, str) or value.strip() in ("", "Automatic", "None"):
            return None
        return value.strip()

    @property
    def checkpoint_setting(self) -> str | None:
        """`override_settings.sd_model_checkpoint` without its ` [hash]`, or None."""
        value = self.override_settings.get("sd_model_checkpoint")
        if not isinstance(value, str) or not strip_hash(value):
            return None
        return strip_hash(value)

    @property
    def eta_noise_seed_delta(self) -> int:
        """A1111's ENSD: added to the seed of the noise that ancestral and SDE samplers draw
        while sampling (`override_settings.eta_noise_seed_delta`)."""
        value = self.override_settings.get("eta_noise_seed_delta", 0)
        try:
            delta = int(value or 0)
        except (TypeError, ValueError):
            raise InvalidPayload(f"override_settings.eta_noise_seed_delta: not a number ({value!r})") from None
        if not 0 <= delta <= MAX_SEED:
            raise InvalidPayload(f"override_settings.eta_noise_seed_delta: must be 0..{MAX_SEED} (got {delta})")
        return delta

    def controlnet_units(self):
        """The enabled ControlNet units of `alwayson_scripts`, validated (see `controlnet.py`)."""
        from services.inference.worker.engine.controlnet import parse_units  # it imports this module

        return parse_units(self.alwayson_scripts)

    def lora_tags(self, prompt: str | None = None) -> tuple[str, dict[str, float]]:
        """The prompt (or `prompt`) without its `<lora:name:weight>` tags, and the weights by
        LoRA name."""
        weights: dict[str, float] = {}

        def take(match: re.Match) -> str:
            name, weight = match[1].strip(), (match[2] or "").strip()
            try:
                value = float(weight) if weight else 1.0
            except ValueError:
                raise InvalidPayload(f"prompt: LoRA {name!r} has a weight that is not a number ({weight!r})") from None
            weights[name] = weights.get(name, 0.0) + value
            return ""

        prompt = _LORA_TAG.sub(take, self.prompt if prompt is None else prompt)
        prompt = re.sub(r"\s+,", ",", re.sub(r"[ \t]{2,}", " ", prompt))
        return prompt.strip(" ,"), weights

    def init_image(self) -> Image.Image:
        return decode_image(self.init_images[0]).convert("RGB")


PROMPT_FIELDS = ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt")


def check_prompt_lengths(payload: dict[str, Any], limit: int) -> None:
    """Every prompt is split into 75-token chunks, each encoded on its own: a prompt of
    megabytes holds a worker for minutes and gigabytes. Refused above `limit` characters."""
    for field in PROMPT_FIELDS:
        value = payload.get(field)
        if isinstance(value, str) and len(value) > limit:
            raise InvalidPayload(
                f"{field} is {len(value)} characters long; at most {limit} are accepted (ESD_MAX_PROMPT_CHARS)"
            )


def strip_hash(name: str) -> str:
    """A1111's model title without its ` [hash]`."""
    return _HASH_SUFFIX.sub("", name).strip()


def decode_image(text: str) -> Image.Image:
    """A base64 PNG/JPEG/WebP, with or without a `data:image/...;base64,` prefix; its size is
    checked from its header, before it is decoded."""
    try:
        raw = base64.b64decode(_DATA_URL.sub("", text.strip()), validate=False)
        image = open_image(io.BytesIO(raw))
        image.load()
    except ImageTooLarge as error:
        raise InvalidPayload(error.message) from None
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError):
        raise InvalidPayload("not a base64-encoded PNG or JPEG image") from None
    return image


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] not in ("value_error",) and "input" in item and not isinstance(item["input"], (dict, list)):
            message += f" (got {excerpt(repr(item['input']))})"  # a user's text is never repeated whole
        parts.append(f"{location}: {message}" if location else message)
    return "; ".join(parts)
