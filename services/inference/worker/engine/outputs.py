"""What the image tasks that are not generation (extras, background removal) hand back to the
worker: named PNGs, the request as understood and an info record."""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from PIL import Image, PngImagePlugin


@dataclass
class NamedImage:
    name: str  # the object's file name under out/<id>/result/
    png: bytes


@dataclass
class ImagesResult:
    images: list[NamedImage]
    parameters: dict[str, Any]  # the request as understood, images left out
    info: dict[str, Any] = field(default_factory=dict)


def png(image: Image.Image, texts: Mapping[str, str] | None = None) -> bytes:
    """The image as a PNG in its own mode (RGB, RGBA or L), with `texts` as text chunks."""
    chunks = PngImagePlugin.PngInfo()
    for key, value in (texts or {}).items():
        if value.isascii():
            chunks.add_text(key, value)
        else:
            chunks.add_itxt(key, value)  # UTF-8 text
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=chunks, compress_level=4)
    return buffer.getvalue()


_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]+")


def output_names(given: list[str | None]) -> list[str]:
    """A PNG file name per image: the given name's stem (made safe for a storage key) or
    `image_<n>`; a name that repeats gets `-<k>`."""
    names: list[str] = []
    taken: set[str] = set()
    for index, name in enumerate(given):
        stem = ""
        if name:
            stem = _UNSAFE.sub("_", PurePosixPath(name.replace("\\", "/")).name).strip(" .")
            stem = stem.rsplit(".", 1)[0] if "." in stem else stem
            stem = stem.strip(" .")[:200]
        stem = stem or f"image_{index}"
        candidate, k = f"{stem}.png", 1
        while candidate.lower() in taken:
            candidate, k = f"{stem}-{k}.png", k + 1
        taken.add(candidate.lower())
        names.append(candidate)
    return names
