"""Image upscalers found by name, each a callable `upscale(image, target) -> image` that
returns the image at exactly `target` (width, height): the extras use them, and so can any
other step that enlarges an image (a hires fix).

    upscalers = Upscalers(device=torch.device("cuda"), tile_size=256, tile_overlap=32)
    upscale = upscalers.find("4x-UltraSharp", {"4x-UltraSharp.pth": path})
    big = upscale(image, (1024, 1024))

Built in: `None` and `Lanczos` (a Lanczos resize) and `Nearest`. Any other name is one of the
job's upscaler model files (ESRGAN, RealESRGAN, SwinIR, HAT, DAT, ScuNET checkpoints), by file
name or by stem, loaded through spandrel and run on the worker's device in overlapping tiles,
so that a large image fits in memory. As in AUTOMATIC1111, a model is run up to three times
while the image is smaller than the target (a 2x model reaches 4x in two passes), and the last
pass is resized to the target with Lanczos.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusion.image_models import UnsupportedImageModel, load_image_model
from shared.errors import Invalid

Size = tuple[int, int]
Upscale = Callable[[Image.Image, Size], Image.Image]

MAX_MODEL_PASSES = 3  # as AUTOMATIC1111: a 2x model reaches at most 8x


class UnknownUpscaler(Invalid):
    """No built-in upscaler and none of the job's upscaler models has this name."""


def resize_with(resample: Image.Resampling) -> Upscale:
    def upscale(image: Image.Image, target: Size) -> Image.Image:
        return image if image.size == tuple(target) else image.resize(tuple(target), resample=resample)

    return upscale


# "None" is AUTOMATIC1111's upscaler that adds nothing: the image is only resized to the target
BUILT_IN: dict[str, Upscale] = {
    "None": resize_with(Image.Resampling.LANCZOS),
    "Lanczos": resize_with(Image.Resampling.LANCZOS),
    "Nearest": resize_with(Image.Resampling.NEAREST),
}


# --- tiles --------------------------------------------------------------------------------


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where tiles of `tile` pixels start along an axis of `length` pixels, consecutive ones
    overlapping by at least `overlap`; the last ends at the edge."""
    if tile <= 0 or length <= tile:
        return [0]
    step = max(1, tile - overlap)
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return starts


def blend_margin(overlap: int) -> int:
    """Input pixels at a tile's inner edge that get no weight at all: an upscaler's output is
    wrong near an edge it cannot see past. Pixels further in are blended with a linear ramp."""
    return overlap // 4


def _ramp(length: int, *, low: bool, high: bool, margin: float, width: float) -> torch.Tensor:
    """Blend weights of one tile along one axis (output pixels): 0 within `margin` of an inner
    edge, rising linearly over `width`, 1 inside; no ramp on an edge of the image."""
    position = torch.arange(length, dtype=torch.float32) + 0.5
    weight = torch.ones(length)
    for enabled, distance in ((low, position), (high, length - position)):
        if enabled:
            ramp = (distance - margin) / width if width > 0 else (distance > margin).float()
            weight = weight * ramp.clamp(0, 1)
    return weight


def tiled(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    *,
    scale: int,
    tile: int,
    overlap: int,
) -> torch.Tensor:
    """`model` (an image-to-image model enlarging `scale` times) run over `image` (1, C, H, W)
    in tiles of `tile` pixels a side overlapping by `overlap`, blended: equal to one run over
    the whole image wherever the model sees no further than `blend_margin(overlap)` pixels.
    The result is assembled on the CPU in float32, so only one tile is on the device at once."""
    _, _, height, width = image.shape
    if tile <= 0 or (height <= tile and width <= tile):
        return model(image).float().cpu()
    overlap = max(0, min(overlap, tile // 2))
    margin = blend_margin(overlap)
    ramp_width = (overlap - 2 * margin) * scale
    output: torch.Tensor | None = None
    weights = torch.zeros(1, 1, height * scale, width * scale)
    for top in tile_starts(height, tile, overlap):
        for left in tile_starts(width, tile, overlap):
            bottom, right = min(top + tile, height), min(left + tile, width)
            piece = model(image[:, :, top:bottom, left:right]).float().cpu()
            if output is None:
                output = torch.zeros(1, piece.shape[1], height * scale, width * scale)
            rows = _ramp(piece.shape[2], low=top > 0, high=bottom < height, margin=margin * scale, width=ramp_width)
            columns = _ramp(piece.shape[3], low=left > 0, high=right < width, margin=margin * scale, width=ramp_width)
            weight = rows[:, None] * columns[None, :]
            region = (slice(None), slice(None), slice(top * scale, bottom * scale), slice(left * scale, right * scale))
            output[region] += piece * weight
            weights[region] += weight
    assert output is not None
    return output / weights.clamp_min(1e-12)


# --- models -------------------------------------------------------------------------------


def to_tensor(image: Image.Image, channels: int) -> torch.Tensor:
    mode = "L" if channels == 1 else "RGB"
    pixels = np.asarray(image.convert(mode), dtype=np.float32) / 255.0
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous()


def to_image(tensor: torch.Tensor) -> Image.Image:
    pixels = (tensor[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if pixels.shape[2] == 1:
        return Image.fromarray(pixels[:, :, 0], mode="L").convert("RGB")
    return Image.fromarray(pixels, mode="RGB")


class ModelUpscaler:
    """A spandrel image model as an `Upscale`."""

    def __init__(self, name: str, descriptor, *, tile_size: int, tile_overlap: int) -> None:
        if descriptor.input_channels not in (1, 3):
            raise UnsupportedImageModel(f"upscaler {name} takes {descriptor.input_channels} channels, not RGB")
        self.name = name
        self.descriptor = descriptor
        self.scale = int(descriptor.scale)
        # a model that looks at the whole image at once is run on the whole image
        self.tile_size = 0 if descriptor.tiling.name == "INTERNAL" else tile_size
        self.tile_overlap = tile_overlap

    def __call__(self, image: Image.Image, target: Size) -> Image.Image:
        target = (int(target[0]), int(target[1]))
        current = image
        for _ in range(MAX_MODEL_PASSES):
            if current.width >= target[0] and current.height >= target[1]:
                break
            before = current.size
            current = self.run(current)
            if current.size == before:
                break  # a 1x model: more passes change nothing
        return resize_with(Image.Resampling.LANCZOS)(current, target)

    def run(self, image: Image.Image) -> Image.Image:
        """One pass of the model over the image."""
        descriptor = self.descriptor
        tensor = to_tensor(image, descriptor.input_channels)

        def on_device(piece: torch.Tensor) -> torch.Tensor:
            return descriptor(piece.to(device=descriptor.device, dtype=descriptor.dtype))

        with torch.inference_mode():
            output = tiled(on_device, tensor, scale=self.scale, tile=self.tile_size, overlap=self.tile_overlap)
        return to_image(output)


@dataclass(frozen=True)
class _FileKey:
    path: Path
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> _FileKey:
        resolved = Path(path).resolve()
        stat = resolved.stat()
        return cls(resolved, stat.st_size, stat.st_mtime_ns)


def match_model(name: str, models: Mapping[str, Path]) -> tuple[str, Path] | None:
    """The model file a name means: the file name itself or its stem, ignoring case."""
    wanted = name.strip().lower()
    for file_name, path in models.items():
        if wanted in (file_name.lower(), Path(file_name).stem.lower()):
            return file_name, path
    return None


class Upscalers:
    """Finds upscalers by name; model upscalers stay loaded (the last `max_models` used)."""

    def __init__(
        self,
        *,
        device: torch.device | str = "cpu",
        tile_size: int = 256,
        tile_overlap: int = 32,
        max_models: int = 2,
    ) -> None:
        self.device = torch.device(device)
        self.tile_size = max(0, tile_size)
        self.tile_overlap = max(0, tile_overlap)
        self.max_models = max(1, max_models)
        self.loads = 0  # model files read from disk
        self._models: OrderedDict[_FileKey, object] = OrderedDict()
        self._lock = threading.Lock()

    def find(self, name: str, models: Mapping[str, Path]) -> Upscale:
        """The upscaler called `name`: a built-in one, or one of `models` (file name -> path)."""
        for built_in, upscale in BUILT_IN.items():
            if name.strip().lower() == built_in.lower():
                return upscale
        found = match_model(name, models)
        if found is None:
            known = [*BUILT_IN, *(Path(file_name).stem for file_name in models)]
            raise UnknownUpscaler(f"upscaler {name!r} is not available; this job can use {', '.join(known)}")
        file_name, path = found
        return ModelUpscaler(
            Path(file_name).stem,
            self._descriptor(path),
            tile_size=self.tile_size,
            tile_overlap=self.tile_overlap,
        )

    def _descriptor(self, path: Path):
        key = _FileKey.of(path)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            while len(self._models) >= self.max_models:
                self._models.popitem(last=False)
            descriptor = load_image_model(key.path, device=self.device, half=self.device.type == "cuda")
            if descriptor.purpose == "FaceSR":
                raise UnsupportedImageModel(
                    f"{path.name} is a face restoration model ({descriptor.architecture.name}), not an upscaler"
                )
            self.loads += 1
            self._models[key] = descriptor
            return descriptor
