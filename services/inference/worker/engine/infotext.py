"""AUTOMATIC1111's "infotext": the generation parameters written into each PNG's `parameters`
text chunk, and the `info` object its API returns beside the images."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

VERSION = "esd-platform"


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
    """The image as an 8-bit RGB PNG carrying `text` in its `parameters` chunk.

    Written here rather than by Pillow for speed, since encoding is part of the time per image:
    every row gets PNG's "Up" filter and zlib's run-length strategy at level 1, which is several
    times faster than Pillow's adaptive filtering for SD's fine-grained images, at about the
    size of Pillow's default output.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    height, width, _ = pixels.shape
    flat = pixels.reshape(height, width * 3)
    rows = np.empty((height, width * 3 + 1), dtype=np.uint8)
    rows[:, 0] = 2  # filter type Up: each byte minus the one above it
    rows[0, 1:] = flat[0]
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])  # uint8 arithmetic wraps modulo 256
    compressor = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
    data = compressor.compress(rows.tobytes()) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, no interlace
    return b"".join(
        (
            _PNG_SIGNATURE,
            _chunk(b"IHDR", header),
            _text_chunk("parameters", text),
            _chunk(b"IDAT", data),
            _chunk(b"IEND", b""),
        )
    )


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _text_chunk(keyword: str, text: str) -> bytes:
    # tEXt holds Latin-1 only; other text goes in an uncompressed iTXt chunk (UTF-8), as Pillow does
    try:
        return _chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + text.encode("latin-1"))
    except UnicodeEncodeError:
        return _chunk(b"iTXt", keyword.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8"))
