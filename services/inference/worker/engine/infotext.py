"""AUTOMATIC1111's "infotext": the generation parameters written into each PNG's `parameters`
text chunk, and the `info` object its API returns beside the images."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

VERSION = "esd-platform"
# zlib level 1: a fraction of the default's time for images of random-ish content, a little
# larger files; the encoding is part of the time per image the worker is measured on.
PNG_COMPRESS_LEVEL = 1


def infotext(prompt: str, negative_prompt: str, parameters: Mapping[str, Any]) -> str:
    """`<prompt>\\nNegative prompt: <neg>\\nSteps: 20, Sampler: Euler a, ...`; the negative line
    is left out when empty, as A1111 does; parameters with a None value are skipped."""
    fields = ", ".join(f"{key}: {_format(value)}" for key, value in parameters.items() if value is not None)
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(fields)
    return "\n".join(lines)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    # A1111 quotes values that would break the comma-separated list
    if any(char in text for char in ',:"\n'):
        return '"' + text.replace('"', '\\"').replace("\n", " ") + '"'
    return text


def png_with_parameters(image: Image.Image, text: str) -> bytes:
    chunk = PngInfo()
    chunk.add_text("parameters", text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=chunk, compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()
