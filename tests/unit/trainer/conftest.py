"""A tiny random-weight checkpoint and a small kohya dataset, written once per session, and
one training run on them that several tests look at."""

from __future__ import annotations

import os

# Read by huggingface_hub when it is first imported: set before diffusers is.
os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion import testing
from services.training.worker.trainer import TrainingConfig, TrainingProgress, train_lora

# 64x64 images make 8x8 latents for the tiny model: a step takes milliseconds on a CPU.
SMALL = {"resolution": 64, "seed": 7}


def write_image(path: Path, seed: int, size: tuple[int, int] = (64, 64), caption: str | None = None) -> Path:
    """A random picture of `size` (width, height) with, if given, its caption file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return testing.make_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny.safetensors", seed=0)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """Two captioned images at the top, two more in `2_concept/` (one without a caption):
    six images per epoch."""
    folder = tmp_path_factory.mktemp("dataset")
    write_image(folder / "cat.png", 1, caption="a photo of a cat")
    write_image(folder / "dog.jpg", 2, caption="a painting of a dog")
    write_image(folder / "2_concept" / "red.png", 3, caption="red house, sky")
    write_image(folder / "2_concept" / "blue.webp", 4)
    return folder


@pytest.fixture(scope="session")
def trained(checkpoint, dataset, tmp_path_factory):
    """Two epochs saving every epoch, with every progress report kept."""
    reports: list[TrainingProgress] = []
    config = TrainingConfig.from_esd(
        {"training": {"output_name": "style", "max_train_epochs": 2, "save_every_n_epochs": 1, **SMALL}}
    )
    result = train_lora(checkpoint, dataset, config, tmp_path_factory.mktemp("out"), progress=reports.append)
    return result, reports
