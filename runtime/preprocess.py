"""Images in, model pixels out: loading as transformers' load_image does, then Qwen2VLImageProcessor in numpy.

Every step mirrors the HF image processor exactly (PIL bicubic resize of the uint8 image, float64
rescale cast to float32, float32 normalisation, the same patch order), so pixel_values match it to
the last bit; parameters come from the bundle's manifest, which export read from the checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError
from .grounding import ImageGeometry

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, bytes]

MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class PreprocessConfig:
    """The checkpoint's preprocessor_config.json, as the manifest records it."""

    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float
    max_image_pixels: int  # decompression-bomb limit on the *original* image

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


@dataclass
class PreparedImage:
    """One image ready for the vision encoder."""

    pixel_values: np.ndarray  # float32 [grid_h * grid_w, 3 * temporal_patch * patch * patch]
    grid_thw: tuple[int, int, int]
    geometry: ImageGeometry
    key: str  # content hash of the decoded image: the feature and prefix caches' key


def _describe(image: ImageInput) -> str:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return f"<{type(image).__name__}>"


def load_image(image: ImageInput, max_image_pixels: int) -> Image.Image:
    """An RGB PIL image, EXIF orientation applied, as transformers.image_utils.load_image returns it.

    The size is checked against `max_image_pixels` from the header, before anything is decoded.
    """
    name = _describe(image)
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    elif isinstance(image, (str, os.PathLike, bytes)):
        image = _open(image, name)
    elif not isinstance(image, Image.Image):
        raise ImageError(f"unsupported image type {type(image).__name__}: give a path, PIL image, array or bytes")
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"{name}: empty image ({width}x{height})")
    if width * height > max_image_pixels:
        raise ImageError(f"{name}: {width}x{height} is over the limit of {max_image_pixels} pixels "
                         "(decompression-bomb guard)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            image.load()
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError(f"{name}: cannot decode image ({err})") from None


def _open(source: str | os.PathLike | bytes, name: str) -> Image.Image:
    """Open (header only) a file or bytes; decoding happens in load_image after the size check."""
    if isinstance(source, bytes):
        if not source:
            raise ImageError("image bytes are empty")
        handle: io.BytesIO | Path = io.BytesIO(source)
    else:
        handle = Path(source)
        if not handle.exists():
            raise ImageError(f"{name}: no such file")
        if handle.is_dir():
            raise ImageError(f"{name}: is a directory, not an image")
        if handle.stat().st_size == 0:
            raise ImageError(f"{name}: file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(handle)
    except Image.DecompressionBombError:
        # PIL refuses at twice its MAX_IMAGE_PIXELS before our own (header) check can run.
        raise ImageError(f"{name}: image is over the limit of {2 * Image.MAX_IMAGE_PIXELS} pixels "
                         "(decompression-bomb guard)") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a readable image file") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError(f"{name}: cannot open image ({err})") from None


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageError(f"image arrays must be uint8 (got {array.dtype})")
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4)):
        return Image.fromarray(array.squeeze(2) if array.ndim == 3 and array.shape[2] == 1 else array)
    raise ImageError(f"image arrays must be HxW, HxWx3 or HxWx4 (got shape {array.shape})")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule: sides multiple of `factor`, area within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(f"aspect ratio {max(height, width) / min(height, width):.0f} of a {width}x{height} image "
                         f"is over the model's limit of {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_bicubic(image: Image.Image, width: int, height: int) -> Image.Image:
    """PIL's bicubic resize, its two passes made explicit so that the pixels do not depend on the Pillow
    version: the passes go through an 8-bit image, so their order matters, and Pillow 13 changed it (the
    vertical pass first when the height shrinks by over twice as many pixels as the width). That order is
    the bundle's contract (BUNDLE.md), which the native runtime follows too; one-axis resizes are the same
    in every Pillow, and with Pillow 13 this equals its one-call resize."""
    old_width, old_height = image.size
    if width != old_width and height != old_height:
        vertical_first = height < old_height and old_height - height > 2 * (old_width - width)
        image = image.resize((old_width, height) if vertical_first else (width, old_height), Image.Resampling.BICUBIC)
    return image.resize((width, height), Image.Resampling.BICUBIC)


def preprocess_image(image: Image.Image, config: PreprocessConfig) -> PreparedImage:
    """Resize, rescale, normalise and patchify one RGB image exactly as Qwen2VLImageProcessor does."""
    width, height = image.size
    resized_h, resized_w = smart_resize(height, width, config.factor, config.min_pixels, config.max_pixels)
    resized = np.asarray(resize_bicubic(image, resized_w, resized_h))
    pixels = (resized.astype(np.float64) * config.rescale_factor).astype(np.float32)
    pixels = (pixels - np.asarray(config.image_mean, np.float32)) / np.asarray(config.image_std, np.float32)

    p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
    grid_h, grid_w = resized_h // p, resized_w // p
    # HWC -> (gh/m, gw/m, m, m, C, p, p): each merge group's m*m patches are contiguous rows.
    patches = pixels.reshape(grid_h // m, m, p, grid_w // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
    pixel_values = np.ascontiguousarray(patches.reshape(grid_h * grid_w, 3 * t * p * p))
    key = hashlib.blake2b(image.tobytes(), digest_size=16, salt=b"%d" % width).hexdigest() + f"-{width}x{height}"
    return PreparedImage(pixel_values, (1, grid_h, grid_w), ImageGeometry(width, height, resized_w, resized_h), key)
