"""The kohya training arguments a user may give in an ESD training's `config_params`, in
kohya's names, and how ESD's forms of them map onto one `TrainingConfig`.

ESD clients send kohya arguments either flat under `training` (`{"training": {"output_name":
..., "max_train_epochs": 2}}`) or grouped as kohya's GUI and its TOML config files export them
(`saving_arguments`, `training_arguments`, `additional_network_arguments`, ...), sometimes with
the GUI's own names (`epoch`, `optimizer`, `max_resolution`) and with `""` for "not set".
`TrainingConfig.from_esd` reads all of these; arguments the trainer has no use for are ignored.
Pure pydantic, so that the training service can refuse a bad config when the training is
created, without torch, by the same rules the training worker trains by.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from shared.errors import Invalid

Resolution = tuple[int, int]  # (width, height)

OPTIMIZERS = ("AdamW", "AdamW8bit")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")

# kohya GUI names -> the trainer's (kohya's command-line) names
_ALIASES = {
    "epoch": "max_train_epochs",
    "optimizer": "optimizer_type",
    "max_resolution": "resolution",
}
# Values that kohya's GUI writes for "not set" on these fields.
_ZERO_MEANS_UNSET = {"max_train_steps", "save_every_n_epochs", "unet_lr", "text_encoder_lr"}
_OUTPUT_NAME = re.compile(r"^[\w][\w.\- ]{0,127}$")


class InvalidTrainingConfig(Invalid):
    """An argument has a value the trainer cannot use; the message starts with the argument's
    name (`learning_rate: Input should be greater than 0 (got -1)`)."""


class TrainingConfig(BaseModel):
    """A LoRA training run's arguments, named and defaulted as in kohya's sd-scripts except:

    - `network_alpha` defaults to `network_dim` (a LoRA scale of 1, as in diffusers' LoRA
      example) rather than kohya's 1, which with the default learning rate trains a dim-8
      LoRA eight times more timidly;
    - `max_train_steps`, when given alone, decides the length (kohya's default of 1600 steps
      does not apply); when both it and `max_train_epochs` are given, epochs win as in kohya.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    output_name: str = "lora"
    fm_type: Literal["sd_1_5", "sd_xl"] = "sd_1_5"
    max_train_epochs: int = Field(1, ge=1, le=10_000)
    max_train_steps: int | None = Field(None, ge=1, le=10_000_000)
    save_every_n_epochs: int | None = Field(None, ge=1)
    train_batch_size: int = Field(1, ge=1, le=1024)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    learning_rate: float = Field(1e-4, gt=0, le=10)
    unet_lr: float | None = Field(None, gt=0, le=10)
    text_encoder_lr: float | None = Field(None, gt=0, le=10)
    train_text_encoder: bool = False
    lr_scheduler: Literal[LR_SCHEDULERS] = "constant"  # type: ignore[valid-type]
    lr_warmup_steps: int = Field(0, ge=0)
    optimizer_type: str = "AdamW"
    max_grad_norm: float = Field(1.0, ge=0)  # 0: no clipping
    network_dim: int = Field(8, ge=1, le=1024)
    network_alpha: float | None = Field(None, gt=0)  # None: network_dim
    resolution: Resolution = (512, 512)
    caption_extension: str = ".txt"
    clip_skip: int = Field(1, ge=1, le=12)
    noise_offset: float = Field(0.0, ge=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**32)  # None: drawn at random, reported
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # CUDA only; the CPU trains in fp32
    save_precision: Literal["float", "fp16", "bf16"] = "float"
    gradient_checkpointing: bool = False

    @classmethod
    def from_esd(cls, config_params: Mapping[str, Any] | None, **overrides: Any) -> TrainingConfig:
        """The config of an ESD training's `params.config_params`: kohya arguments at the top
        level, flat under `training` or in kohya's argument groups (any section that is an
        object); top-level values win over sections, `overrides` over everything."""
        if config_params is not None and not isinstance(config_params, Mapping):
            raise InvalidTrainingConfig(f"config_params must be an object, not {type(config_params).__name__}")
        merged: dict[str, Any] = {}
        top_level: dict[str, Any] = {}
        for key, value in (config_params or {}).items():
            if isinstance(value, Mapping):
                merged.update(value)
            else:
                top_level[key] = value
        merged.update(top_level)
        merged.update(overrides)
        try:
            return cls.model_validate(_kohya_arguments(merged))
        except ValidationError as error:
            raise InvalidTrainingConfig(_describe(error)) from None

    # Derived values.

    @property
    def alpha(self) -> float:
        return float(self.network_alpha if self.network_alpha is not None else self.network_dim)

    @property
    def unet_learning_rate(self) -> float:
        return self.unet_lr if self.unet_lr is not None else self.learning_rate

    @property
    def text_encoder_learning_rate(self) -> float:
        return self.text_encoder_lr if self.text_encoder_lr is not None else self.learning_rate

    # Validation.

    @field_validator("output_name", mode="before")
    @classmethod
    def _output_name(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        name = value.strip()
        name = name[: -len(".safetensors")] if name.lower().endswith(".safetensors") else name
        if not _OUTPUT_NAME.match(name) or ".." in name:
            raise ValueError(
                f"{value!r} is not a usable file name (letters, digits, '.', '-', '_' and spaces, "
                "at most 128 characters)"
            )
        return name

    @field_validator("optimizer_type", mode="before")
    @classmethod
    def _optimizer(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        for name in OPTIMIZERS:
            if value.strip().lower() == name.lower():
                return name
        raise ValueError(f"{value!r} is not supported; use one of {', '.join(OPTIMIZERS)}")

    @field_validator("lr_scheduler", "fm_type", mode="before")
    @classmethod
    def _lower_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("mixed_precision", "save_precision", mode="before")
    @classmethod
    def _precision(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, str):
            return value
        value = value.strip().lower()
        full = "no" if info.field_name == "mixed_precision" else "float"
        return full if value in {"no", "none", "float", "fp32", "float32"} else value

    @field_validator("caption_extension", mode="before")
    @classmethod
    def _extension(cls, value: Any) -> Any:
        if isinstance(value, str) and value and not value.startswith("."):
            return f".{value}"
        return value

    @field_validator("resolution", mode="before")
    @classmethod
    def _resolution(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("must be a size such as 512 or '512,768'")
        if isinstance(value, int | float):
            sides: list[Any] = [value, value]
        elif isinstance(value, str):
            sides = [side.strip() for side in re.split(r"[,x×]", value.strip().strip("()[]"))]
            sides = sides * 2 if len(sides) == 1 else sides
        elif isinstance(value, list | tuple):
            sides = list(value) * 2 if len(value) == 1 else list(value)
        else:
            raise ValueError("must be a size such as 512 or '512,768'")
        try:
            width, height = (int(side) if float(side) == int(float(side)) else None for side in sides)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a size such as 512 or '512,768'") from None
        for side in (width, height):
            if side is None or not 64 <= side <= 4096 or side % 8:
                raise ValueError(f"{value!r}: each side must be a multiple of 8 between 64 and 4096")
        return (width, height)

    @model_validator(mode="before")
    @classmethod
    def _steps_or_epochs(cls, values: Any) -> Any:
        # As in kohya: given both, the number of epochs decides.
        if isinstance(values, Mapping) and values.get("max_train_epochs") is not None:
            values = {key: value for key, value in values.items() if key != "max_train_steps"}
        return values


def _kohya_arguments(values: dict[str, Any]) -> dict[str, Any]:
    """kohya's GUI spellings brought to the command-line names, unset values removed."""
    arguments: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, str) and not value.strip():
            continue  # the GUI's way to leave a field unset
        if value is None:
            continue
        arguments[key] = value
    for alias, name in _ALIASES.items():
        if alias in arguments:
            arguments.setdefault(name, arguments[alias])
            del arguments[alias]
    for name in _ZERO_MEANS_UNSET:
        if name in arguments and _is_zero(arguments[name]):
            del arguments[name]
    if "train_text_encoder" not in arguments and "network_train_unet_only" in arguments:
        # kohya trains the text encoder unless told not to
        arguments["train_text_encoder"] = _negated(arguments["network_train_unet_only"])
    if _is_negative(arguments.get("seed")):
        del arguments["seed"]  # A1111's and some clients' "random"
    if _truthy(arguments.get("sdxl")) and "fm_type" not in arguments:
        arguments["fm_type"] = "sd_xl"
    return arguments


def _is_zero(value: Any) -> bool:
    try:
        return float(value) == 0
    except (TypeError, ValueError):
        return False


def _is_negative(value: Any) -> bool:
    try:
        return float(value) < 0
    except (TypeError, ValueError):
        return False


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in {"true", "1", "yes"})


def _negated(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, str) and value.strip().lower() in {"true", "false", "1", "0", "yes", "no"}:
        return value.strip().lower() in {"false", "0", "no"}
    return value  # not a boolean: let validation name it


def _describe(error: ValidationError) -> str:
    """One line per bad argument: `learning_rate: Input should be greater than 0 (got -1)`."""
    parts = []
    for problem in error.errors():
        field = ".".join(str(part) for part in problem["loc"]) or "config"
        message = problem["msg"].removeprefix("Value error, ")
        given = problem.get("input")
        # pydantic's own messages do not show the value; this module's messages already do
        shown = (
            f" (got {given!r})"
            if problem["type"] != "value_error" and given is not None and not isinstance(given, dict)
            else ""
        )
        parts.append(f"{field}: {message}{shown}")
    return "; ".join(parts)
