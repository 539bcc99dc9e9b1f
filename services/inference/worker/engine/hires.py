"""AUTOMATIC1111's hires fix: the sizes of the second pass and the upscalers between passes.

A txt2img job with `enable_hr` is generated at width x height, upscaled (in latent space by
one of the `Latent` modes, or decoded and upscaled as an image), then refined by an img2img
pass at the target size with `denoising_strength`, `hr_second_pass_steps` (0: the job's steps),
`hr_sampler_name` and `hr_prompt` / `hr_negative_prompt` (empty: the job's own).

The target is `hr_scale` times the size, or `hr_resize_x` x `hr_resize_y`: one of them alone
keeps the aspect ratio; both cover that box and the excess is cropped from the centre, in
whole latent pixels (8 image pixels), as A1111 computes it.

An image upscaler is found by name among the built-in ones and the job's upscaler checkpoints
(`upscalers.Upscalers`, the extras' upscalers); it brings the image to the target size, as
A1111's `resize_image` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from services.inference.worker.engine.request import GenerationRequest, InvalidPayload
from services.inference.worker.engine.upscalers import Upscale

LATENT_FACTOR = 8  # image pixels per latent pixel
MAX_SIDE = 4096

# A1111's latent upscale modes: torch interpolation mode, antialiasing.
LATENT_UPSCALERS: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
DEFAULT_UPSCALER = "Latent"


@dataclass(frozen=True)
class HiresPlan:
    """The second pass of one job."""

    upscale_width: int  # the size upscaled to (A1111's hr_upscale_to_x/y)
    upscale_height: int
    truncate_x: int  # latent pixels cropped from the upscaled width (half each side)
    truncate_y: int
    upscaler: str
    steps: int
    prompt: str
    negative_prompt: str
    infotext: dict[str, Any]  # A1111's extra generation parameters for the hires fix
    upscale: Upscale | None = None  # the image upscaler (none for the latent modes), found by the engine

    @property
    def latent_mode(self) -> tuple[str, bool] | None:
        return LATENT_UPSCALERS.get(self.upscaler)

    @property
    def width(self) -> int:
        """The final image width: whole latent pixels of the upscaled width, less the crop."""
        return (self.upscale_width // LATENT_FACTOR - self.truncate_x) * LATENT_FACTOR

    @property
    def height(self) -> int:
        return (self.upscale_height // LATENT_FACTOR - self.truncate_y) * LATENT_FACTOR


def target_size(width: int, height: int, scale: float, resize_x: int, resize_y: int) -> tuple[int, int, int, int]:
    """(upscale width, upscale height, truncate x, truncate y), as A1111 computes them."""
    if resize_x == 0 and resize_y == 0:
        return int(width * scale), int(height * scale), 0, 0
    if resize_y == 0:
        return resize_x, resize_x * height // width, 0, 0
    if resize_x == 0:
        return resize_y * width // height, resize_y, 0, 0
    if width / height < resize_x / resize_y:
        upscale_width, upscale_height = resize_x, resize_x * height // width
    else:
        upscale_width, upscale_height = resize_y * width // height, resize_y
    return (
        upscale_width,
        upscale_height,
        (upscale_width - resize_x) // LATENT_FACTOR,
        (upscale_height - resize_y) // LATENT_FACTOR,
    )


def plan_hires(request: GenerationRequest) -> HiresPlan | None:
    """The hires pass a txt2img request asks for, or None; an unknown upscaler or a target
    size out of range is the user's mistake."""
    if request.task != "txt2img" or not request.enable_hr:
        return None
    upscaler = request.hr_upscaler or DEFAULT_UPSCALER
    upscale_width, upscale_height, truncate_x, truncate_y = target_size(
        request.width, request.height, request.hr_scale, request.hr_resize_x, request.hr_resize_y
    )
    prompt = request.hr_prompt or request.prompt
    negative_prompt = request.hr_negative_prompt or request.negative_prompt
    infotext: dict[str, Any] = {}
    if request.hr_sampler_name and request.hr_sampler_name != request.sampler_name:
        infotext["Hires sampler"] = request.hr_sampler_name
    if request.hr_scheduler and request.hr_scheduler != request.scheduler:
        infotext["Hires schedule type"] = request.hr_scheduler
    if prompt != request.prompt:
        infotext["Hires prompt"] = prompt
    if negative_prompt != request.negative_prompt:
        infotext["Hires negative prompt"] = negative_prompt
    if request.hr_resize_x == 0 and request.hr_resize_y == 0:
        infotext["Hires upscale"] = request.hr_scale
    else:
        infotext["Hires resize"] = f"{request.hr_resize_x}x{request.hr_resize_y}"
    if request.hr_second_pass_steps:
        infotext["Hires steps"] = request.hr_second_pass_steps
    if request.hr_upscaler is not None:
        infotext["Hires upscaler"] = request.hr_upscaler
    plan = HiresPlan(
        upscale_width=upscale_width,
        upscale_height=upscale_height,
        truncate_x=truncate_x,
        truncate_y=truncate_y,
        upscaler=upscaler,
        steps=request.hr_second_pass_steps or request.steps,
        prompt=prompt,
        negative_prompt=negative_prompt,
        infotext=infotext,
    )
    if not (64 <= plan.width <= MAX_SIDE and 64 <= plan.height <= MAX_SIDE):
        raise InvalidPayload(
            f"hr_scale / hr_resize_x / hr_resize_y: the hires size {plan.width}x{plan.height} is outside "
            f"64..{MAX_SIDE} pixels per side"
        )
    return plan


def upscale_latents(latents: torch.Tensor, plan: HiresPlan) -> torch.Tensor:
    """First-pass latents interpolated to the target size and cropped (latent upscalers)."""
    mode, antialias = plan.latent_mode or LATENT_UPSCALERS[DEFAULT_UPSCALER]
    size = (plan.upscale_height // LATENT_FACTOR, plan.upscale_width // LATENT_FACTOR)
    upscaled = torch.nn.functional.interpolate(latents.float(), size=size, mode=mode, antialias=antialias)
    top, left = plan.truncate_y // 2, plan.truncate_x // 2
    cropped = upscaled[:, :, top : top + plan.height // LATENT_FACTOR, left : left + plan.width // LATENT_FACTOR]
    return cropped.to(latents.dtype)


def upscale_image(image: Image.Image, plan: HiresPlan) -> Image.Image:
    """A first-pass image brought to the target size by the plan's image upscaler (found by the
    engine), then cropped as the plan says."""
    assert plan.upscale is not None, "an image upscaler is found before the first pass"
    image = plan.upscale(image, (plan.upscale_width, plan.upscale_height))
    left = LATENT_FACTOR * (plan.truncate_x // 2)
    top = LATENT_FACTOR * (plan.truncate_y // 2)
    return image.crop((left, top, left + plan.width, top + plan.height))
