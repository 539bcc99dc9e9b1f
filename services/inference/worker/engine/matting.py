"""Alpha matting of a rembg cut-out (`alpha_matting: true`).

The rembg project builds a trimap from the mask (sure foreground above one threshold, sure
background below the other, both eroded) and solves closed-form matting (Levin et al.) for the
alpha of the unsure band, then estimates the foreground colours (multi-level, Germer et al.).
That is not built here yet, so a request for it fails, saying so, rather than returning
something else under its name.
"""

from __future__ import annotations

from PIL import Image

from services.inference.worker.engine.request import InvalidPayload


def alpha_matting_cutout(
    image: Image.Image,
    mask: Image.Image,
    *,
    foreground_threshold: int,
    background_threshold: int,
    erode_size: int,
) -> Image.Image:
    raise InvalidPayload(
        "alpha_matting: alpha matting is not supported by this platform yet; send alpha_matting: false "
        "(the cut-out then uses the model's mask as its alpha)"
    )
