"""What `esd`'s options become: AUTOMATIC1111 payloads, the job's models, datasets from a folder,
kohya arguments. Pure: no network, unit-tested."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")  # `10_cube`: ten repeats of the concept "cube"


class OptionError(ValueError):
    """An option's value that cannot be used; the message says which and why."""


def parse_size(value: str) -> tuple[int, int]:
    """`512x768` (or `512`, square) -> (width, height), multiples of 8 as the model needs."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX*]\s*(\d+))?\s*", value)
    if not match:
        raise OptionError(f"--size {value!r}: write WIDTHxHEIGHT, e.g. 512x768")
    width, height = int(match[1]), int(match[2] or match[1])
    for side in (width, height):
        if side < 8 or side > 8192 or side % 8:
            raise OptionError(f"--size {value!r}: each side must be a multiple of 8 between 8 and 8192")
    return width, height


@dataclass(frozen=True)
class LoraChoice:
    name: str  # as the user wrote it: a checkpoint's file name or its stem
    weight: float


def parse_lora(value: str) -> LoraChoice:
    """`NAME:WEIGHT` (`detail:0.6`) or `NAME` (weight 1)."""
    name, colon, weight = value.rpartition(":")
    if not colon:
        name, weight = value, "1"
    try:
        parsed = float(weight)
    except ValueError:
        raise OptionError(f"--lora {value!r}: write NAME:WEIGHT, e.g. detail:0.6") from None
    if not name.strip():
        raise OptionError(f"--lora {value!r}: the LoRA's name is missing")
    return LoraChoice(name.strip(), parsed)


def pick_checkpoint(wanted: str, names: list[str], kind: str) -> str:
    """The file name among `names` that `wanted` means: itself, or the one whose stem it is."""
    if wanted in names:
        return wanted
    matches = [name for name in names if PurePath(name).stem == wanted]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(sorted(names)) or "none"
    raise OptionError(f"no Active {kind} checkpoint named {wanted!r} (there are: {known})")


@dataclass(frozen=True)
class Generation:
    """A txt2img or img2img request as the options give it."""

    prompt: str
    negative: str = ""
    steps: int = 20
    size: tuple[int, int] = (512, 512)
    sampler: str = "Euler a"
    seed: int = -1
    cfg: float = 7.0
    batch: int = 1
    denoise: float = 0.75
    init_image: bytes | None = None  # img2img

    def payload(self, loras: list[tuple[str, float]]) -> dict[str, Any]:
        """The A1111 body; `loras` are (file name, weight), written into the prompt as A1111's tags."""
        tags = "".join(f" <lora:{PurePath(name).stem}:{weight:g}>" for name, weight in loras)
        body: dict[str, Any] = {
            "prompt": self.prompt + tags,
            "negative_prompt": self.negative,
            "steps": self.steps,
            "sampler_name": self.sampler,
            "width": self.size[0],
            "height": self.size[1],
            "seed": self.seed,
            "cfg_scale": self.cfg,
            "batch_size": self.batch,
            "n_iter": 1,
        }
        if self.init_image is not None:
            body["init_images"] = [base64.b64encode(self.init_image).decode()]
            body["denoising_strength"] = self.denoise
        return body


def job_models(model: str, loras: list[tuple[str, float]]) -> dict[str, list[str]]:
    models = {"Stable-diffusion": [model]}
    if loras:
        models["Lora"] = [name for name, _ in loras]
    return models


@dataclass(frozen=True)
class DatasetFolder:
    """A folder of training images, each with an optional same-named `.txt` caption."""

    files: list[Path]
    prefix: str  # the kohya folder: `<repeats>_<concept>`

    def content(self) -> list[dict[str, Any]]:
        return [
            {
                "filename": path.name,
                "name": path.name,
                "type": "text" if path.suffix == ".txt" else "image",
                "params": {},
            }
            for path in self.files
        ]


def dataset_folder(folder: Path, *, repeats: int | None, concept: str | None) -> DatasetFolder:
    """The images and captions in `folder`. A folder named as kohya's (`10_cube`) gives the
    repeats and the concept unless the options do; otherwise repeats default to 10 and the
    concept to the folder's name."""
    if not folder.is_dir():
        raise OptionError(f"{folder} is not a folder")
    images = sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise OptionError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    captions = [caption for image in images if (caption := image.with_suffix(".txt")).is_file()]
    named = KOHYA_FOLDER.match(folder.name)
    repeats = repeats if repeats is not None else int(named[1]) if named else 10
    concept = concept or (named[2] if named else folder.name)
    if repeats < 1:
        raise OptionError("--repeats must be 1 or more")
    concept = re.sub(r"[^A-Za-z0-9_.-]+", "_", concept).strip("._") or "concept"
    return DatasetFolder(files=images + captions, prefix=f"{repeats}_{concept}")


def training_body(
    *,
    base: str,
    dataset: str,
    output_name: str,
    fm_type: str,
    epochs: int,
    learning_rate: float | None,
    network_dim: int | None,
    network_alpha: float | None,
    resolution: int | None,
    batch_size: int | None,
    save_every: int | None,
    seed: int | None,
    optimizer: str | None,
) -> dict[str, Any]:
    """POST /trainings' body, with the kohya arguments the options set (the rest: defaults)."""
    training = {
        "output_name": output_name,
        "max_train_epochs": epochs,
        "learning_rate": learning_rate,
        "network_dim": network_dim,
        "network_alpha": network_alpha,
        "resolution": resolution,
        "train_batch_size": batch_size,
        "save_every_n_epochs": save_every,
        "seed": seed,
        "optimizer_type": optimizer,
    }
    return {
        "lora_train_type": "kohya",
        "params": {
            "training_params": {
                "training_instance_type": "local",
                "fm_type": fm_type,
                "model": base,
                "dataset": dataset,
            },
            "config_params": {"training": {key: value for key, value in training.items() if value is not None}},
        },
    }


def resolve_endpoint(wanted: str, names: list[str]) -> str:
    """The endpoint `wanted` means: its stored name (`esd-async-mine`) or the name it was created
    with (`mine`)."""
    if wanted in names:
        return wanted
    matches = [name for name in names if name in (f"esd-async-{wanted}", f"esd-real-time-{wanted}")]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(sorted(names)) or "none"
    raise OptionError(f"no endpoint named {wanted!r} (there are: {known})")


def checkpoint_ids(wanted: list[str], checkpoints: list[dict[str, Any]]) -> list[str]:
    """The ids of the checkpoints named by id or by file name (or its stem)."""
    ids = []
    for item in wanted:
        matches = [
            checkpoint["id"]
            for checkpoint in checkpoints
            if item == checkpoint["id"] or any(item in (name, PurePath(name).stem) for name in checkpoint["name"])
        ]
        if len(matches) != 1:
            raise OptionError(
                f"no checkpoint with the id or file name {item!r}"
                if not matches
                else f"{item!r} names {len(matches)} checkpoints: use an id"
            )
        ids.append(matches[0])
    return ids
