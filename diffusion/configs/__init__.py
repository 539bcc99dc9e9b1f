"""Diffusers configs of the architectures the workers load, shipped so that loading a user's
single-file checkpoint never asks the Hugging Face hub for them."""

from __future__ import annotations

import json
from pathlib import Path

SD15_CONFIGS = Path(__file__).parent / "sd15"
SDXL_CONFIGS = Path(__file__).parent / "sdxl"


def read_config(path: Path) -> dict:
    return json.loads(path.read_text())
