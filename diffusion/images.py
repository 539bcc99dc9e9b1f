"""Opening users' images (init images, extras inputs, training data) with a bound on their
size: a few kilobytes of PNG can declare gigapixels that decode to gigabytes. The bound is
PIL's `MAX_IMAGE_PIXELS`, which the workers set from ESD_MAX_IMAGE_PIXELS; PIL itself only
warns below twice its limit, and refuses above it with an error of its own."""

from __future__ import annotations

from typing import IO

from PIL import Image

from shared.errors import Invalid

PIXELS_SETTING = "ESD_MAX_IMAGE_PIXELS"


class ImageTooLarge(Invalid):
    """The image declares more pixels than the workers decode."""


def open_image(source: str | IO[bytes]) -> Image.Image:
    """The image, opened (its header read) and checked, not yet decoded. Not an image: PIL's
    own errors (UnidentifiedImageError, OSError)."""
    try:
        image = Image.open(source)
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"the image has more than {Image.MAX_IMAGE_PIXELS} pixels ({PIXELS_SETTING})") from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.width * image.height > limit:
        image.close()
        raise ImageTooLarge(
            f"the image is {image.width} x {image.height} pixels; at most {limit} pixels are accepted ({PIXELS_SETTING})"
        )
    return image
