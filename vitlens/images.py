"""Decoding and validation of user images, preprocessing, and the offline sample gallery."""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError, OptionError
from .files import read_regular

DEFAULT_MAX_PIXELS = 50_000_000  # about 7000 x 7000; larger uploads are refused before decoding
DEFAULT_MAX_IMAGE_BYTES = 256 * 2**20  # image files larger than this are refused before reading
_WHITE = (255, 255, 255)

# Public-domain photographs shipped inside the scikit-image wheel (no download needed).
GALLERY: dict[str, str] = {
    "astronaut": "astronaut.png",
    "cat": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "motorcycle": "motorcycle_left.png",
    "camera": "camera.png",
    "hubble": "hubble_deep_field.jpg",
    "grass": "grass.png",
}


@dataclass(frozen=True)
class DecodedImage:
    """An RGB image ready for preprocessing.

    Attributes:
        name: File name or gallery name, for display.
        image: 8-bit RGB, EXIF orientation applied.
        digest: SHA-256 of the decoded pixels; the cache key part for this image.
    """

    name: str
    image: Image.Image
    digest: str


def decode_image(data: bytes, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode any common image file to 8-bit RGB.

    Raises:
        ImageError: not an image, truncated or corrupt, too many pixels, or empty.
    """
    if not data:
        raise ImageError(f"'{name}' is empty.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_pixels(image, name, max_pixels)
            image.seek(0)  # first frame of animations and multi-page files
            image.load()
            rgb = _to_rgb(ImageOps.exif_transpose(image))
    except ImageError:
        raise
    except UnidentifiedImageError as error:
        raise ImageError(f"'{name}' is not an image file vitlens can read.") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"'{name}' has too many pixels to decode safely.") from error
    except Exception as error:  # PIL's many decoders raise many exception types on malformed files
        raise ImageError(f"'{name}' is truncated or corrupt and cannot be decoded.") from error
    return DecodedImage(name=name, image=rgb, digest=_pixel_digest(rgb))


def _check_pixels(image: Image.Image, name: str, max_pixels: int) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"'{name}' has no pixels.")
    if width * height > max_pixels:
        raise ImageError(f"'{name}' is {width}x{height} pixels, more than the limit of {max_pixels:,}; "
                         "downscale it first.")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: wide integer and float modes are rescaled, alpha goes on white."""
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257.0).round().astype(np.uint8))
    elif image.mode in ("I", "F"):
        image = Image.fromarray(_stretch_to_uint8(np.asarray(image, dtype=np.float64)))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _stretch_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """32-bit integer or float pixels, stretched from their min to their max."""
    pixels = np.nan_to_num(pixels, posinf=0.0, neginf=0.0)
    low, high = pixels.min(), pixels.max()
    scaled = (pixels - low) / max(high - low, 1e-12) * 255.0
    return np.rint(scaled).astype(np.uint8)


def _pixel_digest(image: Image.Image) -> str:
    digest = hashlib.sha256(f"{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()[:24]


def read_image_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS,
                    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> DecodedImage:
    """Decode an image file from disk (see ``decode_image``).

    Raises:
        ImageError: not a regular file (folder, pipe, device), larger than ``max_bytes``,
            unreadable, or not a decodable image.
    """
    data = read_regular(path, max_bytes, ImageError, "Image")
    return decode_image(data, name=Path(path).name, max_pixels=max_pixels)


def gallery_image(name: str) -> DecodedImage:
    """One of the offline sample photographs in ``GALLERY``."""
    import skimage

    path = Path(skimage.__file__).parent / "data" / GALLERY[name]
    return decode_image(path.read_bytes(), name=name)


def input_shape(image_size: tuple[int, int], side: int, patch_size: int) -> tuple[int, int]:
    """Model input (height, width): the longer side becomes ``side``, the other keeps the aspect
    ratio, rounded to a whole number of patches.

    Raises:
        OptionError: ``side`` is not a positive multiple of ``patch_size``.
    """
    if side < patch_size or side % patch_size:
        raise OptionError(f"Size {side} must be a positive multiple of the patch size {patch_size} "
                          f"(for example {max(1, round(side / patch_size)) * patch_size}).")
    width, height = image_size
    short = min(width, height) / max(width, height) * side
    short = max(1, round(short / patch_size)) * patch_size
    return (side, short) if height >= width else (short, side)


def resize_for_model(image: Image.Image, side: int, patch_size: int) -> Image.Image:
    """The image as the model sees it (before normalisation)."""
    height, width = input_shape(image.size, side, patch_size)
    return image.resize((width, height), Image.Resampling.BICUBIC)


def to_tensor(image: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """8-bit RGB image to a normalised float tensor ``[3, height, width]``."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
