"""A training dataset in kohya's folder layout, read from local disk.

    dataset/
      10_technic/          # <repeats>_<concept>: each image counts 10 times per epoch
        a.png  a.txt       # the caption of a.png
        b.jpg              # no caption: the concept ("technic") is used
      c.webp  c.txt        # outside a kohya folder: repeated once, no concept

Images may lie at any depth; the nearest enclosing `<repeats>_<concept>` folder decides their
repeats and concept. Hidden files and folders (`.git`, `.ipynb_checkpoints`) and macOS's
`__MACOSX` are skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from diffusion.images import ImageTooLarge, open_image
from shared.errors import Invalid

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


class InvalidDataset(Invalid):
    """The dataset holds no usable images, or an image that cannot be read; the message starts
    with `dataset:`."""


@dataclass(frozen=True)
class TrainingImage:
    path: Path
    caption: str
    repeats: int
    folder: str  # the kohya folder it came from ("" for none), for the file's metadata


def read_dataset(folder: Path, caption_extension: str = ".txt") -> list[TrainingImage]:
    """Every image of a kohya dataset folder with its caption and repeats, in a stable order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidDataset(f"dataset: {folder} is not a folder")
    images: list[TrainingImage] = []
    skipped_folders: list[str] = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") or part == "__MACOSX" for part in relative.parts):
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        repeats, concept, kohya_folder = 1, "", ""
        for part in reversed(relative.parts[:-1]):
            match = _KOHYA_FOLDER.match(part)
            if match:
                repeats, concept, kohya_folder = int(match[1]), match[2].strip(), part
                break
        if repeats == 0:  # kohya's way to leave a folder out
            skipped_folders.append(kohya_folder)
            continue
        caption = _caption(path.with_suffix(caption_extension)) or concept
        images.append(TrainingImage(path=path, caption=caption, repeats=repeats, folder=kohya_folder))
    if not images:
        wanted = ", ".join(suffix.lstrip(".") for suffix in IMAGE_SUFFIXES)
        hint = ""
        if skipped_folders:
            hint = f" (folders with 0 repeats were left out: {', '.join(sorted(set(skipped_folders)))})"
        raise InvalidDataset(f"dataset: no images ({wanted}) were found in the dataset{hint}")
    return images


def _caption(path: Path) -> str:
    """The caption file's first non-empty line, as kohya reads it; "" when there is none."""
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace").lstrip("\ufeff")
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def load_pixels(image: TrainingImage, resolution: tuple[int, int]) -> tuple[torch.Tensor, bool]:
    """The image as a (3, height, width) tensor in [-1, 1], scaled to cover `resolution`
    (width, height) and centre-cropped to it; and whether it had to be enlarged."""
    try:
        with open_image(image.path) as opened:
            picture = ImageOps.exif_transpose(opened).convert("RGB")
    except ImageTooLarge as error:
        raise InvalidDataset(f"dataset: {image.path.name}: {error.message}") from None
    except (UnidentifiedImageError, OSError) as error:
        raise InvalidDataset(f"dataset: {image.path.name} could not be read as an image: {error}") from None
    width, height = resolution
    scale = max(width / picture.width, height / picture.height)
    size = (max(width, round(picture.width * scale)), max(height, round(picture.height * scale)))
    if size != picture.size:
        picture = picture.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    picture = picture.crop((left, top, left + width, top + height))
    array = np.asarray(picture, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), scale > 1
